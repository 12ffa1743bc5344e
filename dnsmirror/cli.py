"""The ``dnsmirror`` command: ``serve``, ``config check``, ``config default``, ``ca ...``, ``doctor``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from dnsmirror import __version__, doctor
from dnsmirror import config as configmod


def _cmd_serve(args: argparse.Namespace) -> int:
    from dnsmirror import app

    try:
        config = configmod.load(args.config)
        # serving the example's values (another cloud's resolvers, a made-up registry) is never wanted
        marks = configmod.placeholder_marks(configmod.read_text(Path(args.config))) if args.config else []
    except configmod.ConfigError as exc:
        print(
            f"dnsmirror: invalid configuration ({args.config or 'embedded default'}):\n{exc.describe()}",
            file=sys.stderr,
        )
        return 2
    if marks:
        print(f"dnsmirror: {args.config} still holds the example's PLACEHOLDER marks; not serving:",
              file=sys.stderr)
        for mark in marks:
            print(f"  {mark}", file=sys.stderr)
        return 2
    return app.serve(config)


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = configmod.load(args.file)
    except configmod.ConfigError as exc:
        print(f"{args.file}: invalid configuration", file=sys.stderr)
        for path, message in exc.shown():
            print(f"  {path or '<top>'}: {message}", file=sys.stderr)
        return 1
    print(f"# effective configuration of {args.file} (defaults filled in)")
    print(
        f"# cache.max_size: {configmod.describe_size(config.cache.max_size)}; KB/MB/GB/TB count in powers of "
        "1000, KiB/MiB/GiB/TiB in powers of 1024"
    )
    print(yaml.safe_dump(configmod.to_document(config), sort_keys=False), end="")
    for warning in configmod.placeholder_warnings(configmod.read_text(Path(args.file)), config):
        print(f"warning: {args.file}: {warning}", file=sys.stderr)
    return 0


def _cmd_config_default(args: argparse.Namespace) -> int:
    print(configmod.default_text(), end="")
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
    print(
        f"name constraints); save the certificate, followed by your intermediates, as "
        f"{Path(args.dir) / 'ca.crt'}."
    )
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
    count = len(config.capture)
    covered = "the capture pattern" if count == 1 else f"all {count} capture patterns"
    print(f"{config.tls.ca_cert}: {authority.cert.subject.rfc4514_string()}, valid until "
          f"{authority.not_after:%Y-%m-%d %H:%M} UTC, covers {covered}")
    return 0


def register_ca_commands(commands) -> None:
    """Add ``ca init``, ``ca constraints``, ``ca csr`` and ``ca check`` to the subcommands."""
    from dnsmirror import ca

    parser = commands.add_parser(
        "ca",
        help="the cluster CA that signs per-registry leaves",
        description="Create, describe and check the cluster CA that signs per-registry leaves.",
    )
    ca_commands = parser.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    init = ca_commands.add_parser("init", help="create a name-constrained root and intermediate in DIR",
                                  formatter_class=_Formatter)
    init.add_argument("--dir", required=True, metavar="DIR", help="writes root.crt, root.key, ca.crt, ca.key")
    init.add_argument(
        "--config",
        metavar="FILE",
        help="whose capture patterns to permit (default: the embedded default config)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    init.add_argument(
        "--days",
        type=int,
        default=ca.INTERMEDIATE_DAYS,
        help="intermediate validity in days (at most --root-days)",
    )
    init.add_argument("--root-days", type=int, default=ca.ROOT_DAYS, help="root validity in days")
    init.set_defaults(run=_cmd_ca_init)
    constraints = ca_commands.add_parser(
        "constraints", help="print the DNS subtrees the capture patterns need"
    )
    constraints.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    constraints.set_defaults(run=_cmd_ca_constraints)
    csr = ca_commands.add_parser(
        "csr", help="write a key and a CSR for an intermediate signed by your own PKI"
    )
    csr.add_argument("--dir", required=True, metavar="DIR", help="writes ca.key and ca.csr")
    csr.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    csr.add_argument("--force", action="store_true", help="replace an existing ca.key and ca.csr in DIR")
    csr.set_defaults(run=_cmd_ca_csr)
    check = ca_commands.add_parser("check", help="check tls.ca_cert / tls.ca_key as serve does")
    check.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    check.set_defaults(run=_cmd_ca_check)


_CONFIG_HELP = "YAML config whose capture patterns and tls keys to use (default: the embedded default config)"


class _Formatter(argparse.HelpFormatter):
    """Shows each option's default after its help, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


_DESCRIPTION = (
    "dnsmirror: a node-local OCI registry mirror. A node-local DNS server answers captured registry names "
    "with the mirror's address; an HTTPS mirror serves their content from the local cache, peer nodes or "
    "upstream. Installed in a virtualenv, the command is .venv/bin/dnsmirror."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dnsmirror`` command."""
    parser = argparse.ArgumentParser(prog="dnsmirror", description=_DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"dnsmirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the DNS, HTTPS, peer and metrics listeners",
                                description="Run the DNS, HTTPS, peer and metrics listeners until SIGTERM.")
    serve.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded default config)")
    serve.set_defaults(run=_cmd_serve)

    config = commands.add_parser("config", help="configuration tools", description="Configuration tools.")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_commands.add_parser(
        "check", help="print the effective config, or every error with its key"
    )
    check.add_argument("file", metavar="FILE", help="the YAML config file to check")
    check.set_defaults(run=_cmd_config_check)
    default = config_commands.add_parser("default", help="print the embedded default config (every key, "
                                                         "with comments)")
    default.set_defaults(run=_cmd_config_default)

    register_ca_commands(commands)
    doctor.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dnsmirror`` console script."""
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # the reader went away (``| head``): no traceback, and none from the interpreter's final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
