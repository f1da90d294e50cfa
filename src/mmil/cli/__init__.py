"""``mmil`` command line: argument parsing and printing only.

Each sub-module adds its sub-commands with ``add_commands(subparsers)`` and sets
``func`` on its parsers; the work itself lives in the library modules. Every sub-command
takes the common flags ``--threads``, ``--device``, ``--no-progress`` and ``--seed``
(:func:`mmpl.cliargs.add_common_flags`): a command that uses them declares them itself (with
the attribute its config reads); the others get them, marked unused, after all are built.
"""
from __future__ import annotations

import sys

from mmpl.cliargs import EXIT_USER_ERROR, OneLineParser, add_common_flags_everywhere, apply_common_flags

from ..checkpoint import CheckpointError
from ..errors import MMILInputError


def build_parser() -> OneLineParser:
    from . import bench, core, wsi

    parser = OneLineParser(prog="mmil", description="Multi-level MIL with Transformer for whole-slide image classification.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for module in (core, wsi, bench):
        module.add_commands(sub)
    add_common_flags_everywhere(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_common_flags(args)
    try:
        return int(args.func(args) or 0)
    except (MMILInputError, CheckpointError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"mmil {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # e.g. a disk that filled up or a location that became unwritable mid-run
        if args.debug:
            raise
        print(f"mmil {args.command}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"mmil {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
