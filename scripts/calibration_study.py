"""Measure calibration, conformal coverage and error detection of finished `mmil train` runs (see docs/calibration.md).

Usage: python scripts/calibration_study.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--labels CSV] [--json OUT.json]
       python scripts/calibration_study.py NAME=RUN_DIR[,RUN_DIR...] ... --compare-priors mle 1 0.5
(a RUN_DIR may be a glob; with --compare-priors the temperatures are refitted from the stored validation logits under
each prior and the runs of one NAME are pooled)
"""
from __future__ import annotations

import argparse
import csv
import glob
import json

from mmil.calibration_study import compare_temperature_priors, priors_markdown, study_markdown, study_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    p.add_argument("--json", help="also write the measurements as JSON")
    p.add_argument("--labels", help="label CSV with slide_id and case_id columns: adds patient-level coverage")
    p.add_argument("--compare-priors", nargs="+", metavar="STD", help="refit T under these prior stds of log T (mle: none) instead")
    args = p.parse_args()
    if args.compare_priors:
        priors = [None if v == "mle" else float(v) for v in args.compare_priors]
        for item in args.runs:
            name, _, paths = item.partition("=")
            runs = sorted(r for pattern in paths.split(",") for r in (glob.glob(pattern) or [pattern]))
            print(priors_markdown(compare_temperature_priors(runs, priors), name))
        return
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
