"""`prunelimit compare`: argument parsing and printing only (the work is in compare.py / compare_report.py)."""
from __future__ import annotations

import argparse

from mmpl.cliargs import positive_int
from mmpl.config import add_config_flags, given_flags

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
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--methods", type=_comma_list(str), help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--sparsities", type=_comma_list(float), help="comma-separated removed fractions in [0, 1) (default 0.9,0.95,0.98,0.99)")
    p.add_argument("--seeds", type=_comma_list(int), help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads")
    add_config_flags(p, CompareConfig)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from mmpl.device import resolve_device
    from mmpl.fsio import check_output_dir

    from .compare_report import make_trial_factory, run_compare

    values = given_flags(args, CompareConfig)
    for name in ("methods", "sparsities", "seeds"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = CompareConfig(**values).validate()
    resolve_device(cfg.device, error=PruneLimitError)
    check_output_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_compare(cfg, args.out, make_trial_factory(cfg))
    print(f"results: {args.out}/results.csv, {args.out}/summary.md, {args.out}/accuracy.png")
    return 0
