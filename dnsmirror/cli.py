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


def _load_for_ca(args: argparse.Namespace) -> configmod.Config | None:
    try:
        return configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"dnsmirror: invalid configuration ({args.config or 'embedded default'}):\n{exc.describe()}",
              file=sys.stderr)
        return None


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dnsmirror import ca

    config = _load_for_ca(args)
    if config is None:
        return 2
    try:
        paths = ca.init_directory(Path(args.dir), config.capture, force=args.force,
                                  root_days=args.root_days, intermediate_days=args.days)
    except ca.CaError as exc:
        print(f"dnsmirror: {exc}", file=sys.stderr)
        return 1
    root, root_key, cert, key = paths
    print(f"wrote {root} (distribute to node trust stores), {root_key} (keep offline),")
    print(f"      {cert} and {key} (tls.ca_cert / tls.ca_key of every node)")
    print(ca.describe_constraints(config.capture))
    return 0


def _cmd_ca_constraints(args: argparse.Namespace) -> int:
    from dnsmirror import ca

    config = _load_for_ca(args)
    if config is None:
        return 2
    print(ca.describe_constraints(config.capture))
    return 0


def _cmd_ca_csr(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dnsmirror import ca

    config = _load_for_ca(args)
    if config is None:
        return 2
    try:
        key_path, csr_path = ca.csr_directory(Path(args.dir), config.capture, force=args.force)
    except ca.CaError as exc:
        print(f"dnsmirror: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {key_path} (0600) and {csr_path}.")
    print("Have your PKI sign the CSR as an intermediate CA keeping its extensions (CA, pathlen 0, critical")
    print(f"name constraints); save the certificate, followed by your intermediates, as {Path(args.dir) / 'ca.crt'}.")
    print(ca.describe_constraints(config.capture))
    return 0


def _cmd_ca_check(args: argparse.Namespace) -> int:
    from dnsmirror import ca

    config = _load_for_ca(args)
    if config is None:
        return 2
    try:
        authority, warnings = ca.load_authority(config.tls.ca_cert, config.tls.ca_key, config.capture)
    except ca.CaError as exc:
        print(f"dnsmirror: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{config.tls.ca_cert}: {authority.cert.subject.rfc4514_string()}, valid until "
          f"{authority.not_after:%Y-%m-%d %H:%M} UTC, covers all {len(config.capture)} capture patterns")
    return 0


def register_ca_commands(commands) -> None:
    """Add ``ca init``, ``ca constraints``, ``ca csr`` and ``ca check`` to the subcommands."""
    from dnsmirror import ca

    parser = commands.add_parser("ca", help="the cluster CA that signs per-registry leaves")
    ca_commands = parser.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    init = ca_commands.add_parser("init", help="create a name-constrained root and intermediate in DIR")
    init.add_argument("--dir", required=True, metavar="DIR", help="writes root.crt, root.key, ca.crt, ca.key")
    init.add_argument("--config", metavar="FILE", help="whose capture patterns to permit (default: embedded)")
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    init.add_argument("--days", type=int, default=ca.INTERMEDIATE_DAYS, help="intermediate validity in days")
    init.add_argument("--root-days", type=int, default=ca.ROOT_DAYS, help="root validity in days")
    init.set_defaults(run=_cmd_ca_init)
    constraints = ca_commands.add_parser("constraints", help="print the DNS subtrees the capture patterns need")
    constraints.add_argument("--config", metavar="FILE")
    constraints.set_defaults(run=_cmd_ca_constraints)
    csr = ca_commands.add_parser("csr", help="write a key and a CSR for an intermediate signed by your own PKI")
    csr.add_argument("--dir", required=True, metavar="DIR", help="writes ca.key and ca.csr")
    csr.add_argument("--config", metavar="FILE")
    csr.add_argument("--force", action="store_true")
    csr.set_defaults(run=_cmd_ca_csr)
    check = ca_commands.add_parser("check", help="check tls.ca_cert / tls.ca_key as serve does")
    check.add_argument("--config", metavar="FILE")
    check.set_defaults(run=_cmd_ca_check)


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

    register_ca_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dnsmirror`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)
