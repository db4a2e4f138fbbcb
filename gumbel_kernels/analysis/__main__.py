"""`python -m gumbel_kernels.analysis {distributions,kl,weight-norms} ...` (see --help)."""
import argparse
import sys

from . import distributions, kl, weight_norms

SUBCOMMANDS = {
    "distributions": (distributions, "object distributions on a grid of centres (Fig. 2)"),
    "kl": (kl, "per-class KL(gt || predicted) of spatial distributions (Fig. 5)"),
    "weight-norms": (weight_norms, "classifier weight norms by class frequency (Fig. 1(ii))"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.analysis",
                                     description="Analyses of the GOL paper's figures: PNG "
                                                 "plots and CSV files into --out.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command][0].run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
