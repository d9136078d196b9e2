"""Checking a `vpn-dist ...` command line against the real CLI parser, for tests that parse the commands written in
docs and cluster files (tests/test_cluster_files.py, tests/test_docs.py).

Import from a test module: `from cli_commands import check_vpn_command` (tests/ is on sys.path under pytest's default
import mode).
"""
from __future__ import annotations

import shlex

import pytest


def _parser():
    try:
        from vpn_dist.cli import build_parser
    except Exception as err:  # the CLI module itself is broken or missing
        pytest.fail(f"cannot import vpn_dist.cli.build_parser: {err!r}")
    return build_parser()


def _subparser_options(parser, argv: list[str]) -> set[str]:
    """Option strings valid at the deepest (sub)command that argv selects."""
    import argparse

    options: set[str] = set()
    current = parser
    rest = list(argv)
    while True:
        options |= {s for a in current._actions for s in a.option_strings}
        subactions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subactions:
            return options
        choices = subactions[0].choices
        nxt = next((t for t in rest if t in choices), None)
        if nxt is None:
            return options
        rest = rest[rest.index(nxt) + 1:]
        current = choices[nxt]


def _check_set_overrides(argv: list[str], where: str, command: str) -> None:
    """`--set key=value`: the key must exist in the run config and the value fit its type."""
    values = [argv[i + 1] for i, tok in enumerate(argv[:-1]) if tok == "--set"]
    values += [tok.split("=", 1)[1] for tok in argv if tok.startswith("--set=")]
    if not values:
        return
    try:
        from vpn_dist.config import RunConfig, apply_overrides
        from vpn_dist.errors import UserError
    except ImportError:  # config module not there (yet): argparse checks still apply
        return
    for value in values:
        try:
            apply_overrides(RunConfig(), [value])
        except UserError as err:
            pytest.fail(f"{where}: bad --set {value}: {err}\n  {command}")


def check_vpn_command(argv: list[str], where: str = "<test>"):
    """Parse `vpn-dist ...` argv with the real CLI parser; fail naming the command.

    Also rejects abbreviated long options (argparse would accept `--worker` for
    `--workers`), since documentation should spell flags out.
    """
    assert argv and argv[0] == "vpn-dist", argv
    command = shlex.join(argv)
    parser = _parser()
    try:
        namespace = parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse: exit(2) on a bad flag, exit(0) on --help
        pytest.fail(f"{where}: invalid vpn-dist command (argparse exit {exc.code}):\n  {command}")
    _check_set_overrides(argv, where, command)
    valid = _subparser_options(parser, argv[1:])
    for tok in argv[1:]:
        if tok.startswith("--") and len(tok) > 2:
            flag = tok.split("=", 1)[0]
            if flag not in valid:
                pytest.fail(f"{where}: flag {flag} is not spelled as the CLI defines it "
                            f"(abbreviation?):\n  {command}")
    return namespace
