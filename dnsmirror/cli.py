"""The ``dnsmirror`` command: ``serve``, ``config check``, ``ca ...``."""

from __future__ import annotations

import argparse
import sys

import yaml

from dnsmirror import __version__
from dnsmirror import config as configmod


def _cmd_serve(args: argparse.Namespace) -> int:
    from dnsmirror import app

    try:
        config = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"dnsmirror: invalid configuration ({args.config or 'embedded default'}):\n{exc.describe()}", file=sys.stderr)
        return 2
    return app.serve(config)


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = configmod.load(args.file)
    except configmod.ConfigError as exc:
        print(f"{args.file}: invalid configuration", file=sys.stderr)
        for path, message in exc.problems:
            print(f"  {path or '<top>'}: {message}", file=sys.stderr)
        return 1
    print(f"# effective configuration of {args.file} (defaults filled in)")
    print(yaml.safe_dump(configmod.to_document(config), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dnsmirror`` command."""
    parser = argparse.ArgumentParser(prog="dnsmirror", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dnsmirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the DNS, HTTPS, peer and metrics listeners")
    serve.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded default)")
    serve.set_defaults(run=_cmd_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_commands.add_parser("check", help="print the effective config, or every error with its key")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=_cmd_config_check)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dnsmirror`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)
