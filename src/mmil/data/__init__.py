"""Bags of instance features: readers, label CSVs, folds and synthetic data.

>>> from mmil.data import load_dataset, mil_benchmark_path
>>> ds = load_dataset(mil_benchmark_path("musk1"))        # 92 bags, labels from the CSV
>>> ds = load_dataset("features/", "labels.csv")           # per-slide .h5/.pt + label CSV
"""
from .bags import Bag, BagBatch, pad_bags
from .dataset import KIND_BENCHMARK, KIND_MEMORY, KIND_SLIDES, BagDataset, feature_moments, load_dataset
from .labels import LabelTable, read_label_csv
from .readers import MIL_BENCHMARKS, mil_benchmark_path, read_bag_file, read_mil_csv
from .splits import FoldSplit, holdout_indices, kfold_indices, plan_folds

__all__ = [
    "Bag",
    "BagBatch",
    "pad_bags",
    "BagDataset",
    "load_dataset",
    "feature_moments",
    "KIND_BENCHMARK",
    "KIND_MEMORY",
    "KIND_SLIDES",
    "LabelTable",
    "read_label_csv",
    "MIL_BENCHMARKS",
    "mil_benchmark_path",
    "read_bag_file",
    "read_mil_csv",
    "FoldSplit",
    "holdout_indices",
    "kfold_indices",
    "plan_folds",
]
