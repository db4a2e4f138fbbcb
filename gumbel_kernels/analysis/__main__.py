"""`python -m gumbel_kernels.analysis {distributions,kl,weight-norms} ...` (see --help)."""
import argparse

from .._cli import HelpFormatter, add_debug_flag, run
from . import distributions, kl, weight_norms

SUBCOMMANDS = {
    "distributions": (distributions, "object distributions on a grid of centres (Fig. 2)"),
    "kl": (kl, "per-class KL(gt || predicted) of spatial distributions (Fig. 5)"),
    "weight-norms": (weight_norms, "classifier weight norms by class frequency (Fig. 1(ii))"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.analysis",
                                     description="Analyses of the GOL paper's figures: PNG "
                                                 "plots and CSV files into --out.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=HelpFormatter)
        module.add_arguments(command)
        add_debug_flag(command)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command][0].run(args)


if __name__ == "__main__":
    raise SystemExit(run(main))
