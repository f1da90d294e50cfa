"""Measure calibration, conformal coverage and error detection of finished `mmil train` runs (see docs/calibration.md).

Usage: python scripts/calibration_study.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--labels CSV] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import csv
import json

from mmil.calibration_study import study_markdown, study_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    p.add_argument("--json", help="also write the measurements as JSON")
    p.add_argument("--labels", help="label CSV with slide_id and case_id columns: adds patient-level coverage")
    args = p.parse_args()
    case_of = None
    if args.labels:
        with open(args.labels, newline="") as f:
            case_of = {row["slide_id"]: row["case_id"] for row in csv.DictReader(f)}
    studies = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        studies[name] = study_run(path, case_of=case_of)
        print(study_markdown(studies[name], name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(studies, f, indent=1)


if __name__ == "__main__":
    main()
