"""`vpn-dist`: one console script, one subcommand per job."""
from __future__ import annotations

import argparse
import sys

from vpn_dist.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from data_prep import cli as prep_cli
    from vpn_dist.benchmarks import loader as bench_loader

    parser = argparse.ArgumentParser(prog="vpn-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="convert a data set to FFCV .beton files")
    prep_cli.add_arguments(prep)
    prep.set_defaults(run=prep_cli.run)

    bench = sub.add_parser("bench", help="benchmarks that print figures and ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    loader = bench_sub.add_parser("loader", help="FFCV loader vs torchvision ImageFolder vs in-memory")
    bench_loader.add_arguments(loader)
    loader.set_defaults(run=bench_loader.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as err:
        print(f"vpn-dist {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
