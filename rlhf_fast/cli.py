"""`rlhf-fast <command> [--config x.yaml] [--key value ...]`: one entry point for every stage."""
import argparse
import importlib
import sys

# command -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "demo": ("rlhf_fast.demo", "the embedded end-to-end pipeline on a tiny model, no downloads"),
    "selfcheck": ("rlhf_fast.selfcheck", "every kernel on every available backend vs its fp64 reference"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(rest, prog=f"rlhf-fast {args.command}") or 0


if __name__ == "__main__":
    sys.exit(main())
