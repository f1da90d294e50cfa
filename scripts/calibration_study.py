"""Measure calibration, conformal coverage and error detection of finished `mmil train` runs (see docs/calibration.md).

Usage: python scripts/calibration_study.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json

from mmil.calibration_study import study_markdown, study_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    p.add_argument("--json", help="also write the measurements as JSON")
    args = p.parse_args()
    studies = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        studies[name] = study_run(path)
        print(study_markdown(studies[name], name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(studies, f, indent=1)


if __name__ == "__main__":
    main()
