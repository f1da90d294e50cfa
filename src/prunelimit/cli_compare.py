"""`prunelimit compare`: argument parsing and printing only (the work is in compare.py / compare_report.py)."""
from __future__ import annotations

import argparse

from mmpl.cliargs import add_common_flags
from mmpl.config import add_config_flags, given_flags
from mmpl.device import DEVICE_HELP

from .compare import METHODS, CompareConfig
from .errors import PruneLimitError


def _comma_list(kind: type):
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def add_compare_command(sub) -> None:
    p = sub.add_parser("compare", help="LOMP against magnitude, IMP, SNIP, SynFlow and random pruning",
                       description="Prune one architecture with several methods at several sparsities and seeds, on the same "
                       "data split and training budget; write results.csv, layers.json, summary.md and accuracy.png. "
                       "Rerun the same command to resume.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    p.add_argument("--methods", type=_comma_list(str), help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--sparsities", type=_comma_list(float), help="comma-separated removed fractions in [0, 1) (default 0.9,0.95,0.98,0.99)")
    p.add_argument("--seeds", type=_comma_list(int), help="comma-separated seeds (default 0,1,2)")
    add_config_flags(p, CompareConfig, exclude=("device",))
    add_common_flags(p, helps={"seed": "one seed instead of --seeds' list (default: --seeds' 0,1,2)", "device": DEVICE_HELP,
                               "no_progress": "no progress lines (one per finished method and seed)"})
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from mmpl.device import resolve_device
    from mmpl.fsio import check_output_dir

    from .compare_report import make_trial_factory, run_compare

    values = given_flags(args, CompareConfig)
    values["device"] = str(resolve_device(args.device or "auto", error=PruneLimitError))  # a torch device name: auto resolved
    if args.seed is not None and args.seeds is not None:
        raise PruneLimitError(f"--seed {args.seed} and --seeds: give one of them")
    if args.seed is not None:
        values["seeds"] = [args.seed]
    for name in ("methods", "sparsities", "seeds"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = CompareConfig(**values).validate()
    check_output_dir(args.out)
    run_compare(cfg, args.out, make_trial_factory(cfg), log=(lambda msg: None) if args.no_progress else print)
    print(f"results: {args.out}/results.csv, {args.out}/summary.md, {args.out}/accuracy.png")
    return 0
