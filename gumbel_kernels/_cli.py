"""What the package's command-line tools share: a user error (a bad config value, a missing or
damaged file: ValueError and OSError) is one line on stderr instead of a traceback, unless
`--debug` is given; help texts show the defaults."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

USER_ERRORS = (ValueError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """An option's default appended to its help; the description printed as written. Defaults
    that say nothing (None: "from the config" or "not given"; off switches; empty lists) are
    left out."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")


def run(main: Callable[[Optional[Sequence[str]]], object],
        argv: Optional[Sequence[str]] = None) -> int:
    """Calls main(argv) and turns user errors into 'error: ...' on stderr and exit status 1
    (Ctrl-C: 130). Under torchrun each line names its rank."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    try:
        main(argv)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        print(f"{prefix}interrupted: {stop}" if str(stop) else f"{prefix}interrupted",
              file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prefix}error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0
