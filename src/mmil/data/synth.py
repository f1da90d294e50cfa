"""Synthetic whole-slide-like bags with a known answer.

Each slide is a tissue region on a grid of ``patch_size``-pixel patches (the
union of one to three rotated ellipses with a ragged border, exactly as many
grid cells as instances). Normal tissue is a patchwork of a few tissue types,
spatially coherent (Voronoi regions), each a shared prototype vector plus
Gaussian noise; every slide also gets a random offset ("stain variation").
A positive slide carries a tumour: a spatially clustered 1-10 % of its
instances (one or two foci, the cells nearest to each focus) shifted by
``signal`` along one direction shared by all slides.

Why this is a fair test: the tumour shift of the *slide mean* (``fraction *
signal``, at most 0.4 with the defaults) is smaller than the per-slide stain
offset along the same direction (standard deviation 0.5), so mean pooling
cannot separate the classes reliably, while a model that finds the few shifted
instances can. Everything is a pure function of the seed.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mmpl.fsio import atomic_path
from mmpl.jsonio import write_text
from mmpl.progress import progress as _progress

from ..errors import MMILInputError
from .bags import Bag

N_TISSUE_TYPES = 4


@dataclass(frozen=True)
class SynthSpec:
    """Shared parameters of a synthetic dataset (see the module docstring)."""

    in_dim: int = 128
    min_instances: int = 200
    max_instances: int = 20_000
    positive_fraction: tuple[float, float] = (0.01, 0.10)
    signal: float = 4.0
    stain_std: float = 0.5
    noise_std: float = 1.0
    patch_size: int = 256

    def check(self) -> None:
        if self.in_dim < 2:
            raise MMILInputError(f"--in-dim must be at least 2, got {self.in_dim}")
        if not 1 <= self.min_instances <= self.max_instances:
            raise MMILInputError(f"need 1 <= --min-instances <= --max-instances, got {self.min_instances} and {self.max_instances}")
        lo, hi = self.positive_fraction
        if not 0.0 < lo <= hi <= 1.0:
            raise MMILInputError(f"--positive-fraction needs 0 < LO <= HI <= 1, got {lo} {hi}")


def _tissue_cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct grid cells ``(n, 2)`` (x, y) forming a blob-like tissue region.

    Cells are ranked by ``min_e q_e(p) + ragged(p)`` where ``q_e`` is the
    normalised quadratic form of ellipse ``e`` (1 on its border) and ``ragged`` a
    sum of low-frequency sinusoids; the ``n`` lowest-ranked cells are kept.
    """
    side = int(math.ceil(math.sqrt(n * 3.0))) + 4
    ys, xs = np.mgrid[0:side, 0:side]
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    score = np.full(len(pts), np.inf)
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(0.3, 0.7, size=2) * side
        a, b = rng.uniform(0.15, 0.4, size=2) * side
        theta = rng.uniform(0, np.pi)
        rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        d = (pts - centre) @ rot.T
        score = np.minimum(score, (d[:, 0] / a) ** 2 + (d[:, 1] / b) ** 2)
    for _ in range(3):
        freq = rng.uniform(1.0, 4.0, size=2) * 2 * np.pi / side
        score += 0.15 * np.sin(pts @ freq + rng.uniform(0, 2 * np.pi))
    keep = np.argpartition(score, n - 1)[:n]
    return pts[np.sort(keep)].astype(np.int64)


def _dataset_constants(seed: int, in_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-type prototypes ``(N_TISSUE_TYPES, C)`` and the unit tumour direction ``(C,)``."""
    rng = np.random.default_rng([seed, 7919])
    prototypes = rng.normal(0.0, 1.0, size=(N_TISSUE_TYPES, in_dim))
    direction = rng.normal(size=in_dim)
    return prototypes, direction / np.linalg.norm(direction)


def synthetic_slide(rng: np.random.Generator, n: int, positive: bool, spec: SynthSpec, prototypes: np.ndarray,
                    direction: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One slide: ``(features (n, C) float32, coords (n, 2) int64 pixels, instance_labels (n,) uint8, oracle score)``.

    The oracle knows the tissue prototypes, the stain and the tumour direction ``u``: its slide score is
    ``max_i (x_i - prototype_i - stain) . u``, the largest projection of an instance's noise-plus-tumour residual."""
    cells = _tissue_cells(rng, n)
    n_regions = int(rng.integers(3, 8))
    seeds = cells[rng.choice(n, size=min(n_regions, n), replace=False)]
    region = np.argmin(((cells[:, None, :] - seeds[None, :, :]) ** 2).sum(-1), axis=1)
    region_type = rng.integers(0, N_TISSUE_TYPES, size=len(seeds))
    stain = rng.normal(0.0, spec.stain_std, size=spec.in_dim)
    features = prototypes[region_type[region]] + stain + rng.normal(0.0, spec.noise_std, size=(n, spec.in_dim))
    tumour = np.zeros(n, dtype=np.uint8)
    if positive:
        fraction = rng.uniform(*spec.positive_fraction)
        n_tumour = max(1, int(round(fraction * n)))
        n_foci = 1 if n_tumour < 20 else int(rng.integers(1, 3))
        for share in np.array_split(np.arange(n_tumour), n_foci):
            focus = cells[rng.integers(n)]
            dist = ((cells - focus) ** 2).sum(1).astype(np.float64)
            dist[tumour.astype(bool)] = np.inf  # foci do not overlap
            tumour[np.argsort(dist, kind="stable")[: len(share)]] = 1
        features[tumour.astype(bool)] += spec.signal * direction
    oracle = float(((features - prototypes[region_type[region]] - stain) @ direction).max())
    return features.astype(np.float32), cells * spec.patch_size, tumour, oracle


def _slide_plan(n_slides: int, seed: int, spec: SynthSpec, positive_rate: float, slides_per_case: int):
    """Per slide: (slide_id, case_id, label, n_instances, rng). Labels are per case."""
    if n_slides < 2:
        raise MMILInputError(f"--n-slides must be at least 2 (one per class), got {n_slides}")
    if slides_per_case < 1:
        raise MMILInputError(f"slides per case must be at least 1, got {slides_per_case}")
    root = np.random.default_rng(seed)
    n_cases = int(math.ceil(n_slides / slides_per_case))
    n_pos = min(max(1, int(round(positive_rate * n_cases))), n_cases - 1)
    case_labels = np.zeros(n_cases, dtype=np.int64)
    case_labels[root.permutation(n_cases)[:n_pos]] = 1
    log_lo, log_hi = math.log(spec.min_instances), math.log(spec.max_instances)
    width = len(str(n_slides - 1))
    plan = []
    for s in range(n_slides):
        case = s // slides_per_case
        n = int(round(math.exp(root.uniform(log_lo, log_hi))))
        n = min(max(n, spec.min_instances), spec.max_instances)
        plan.append((f"slide_{s:0{width}d}", f"case_{case:0{width}d}", int(case_labels[case]), n, np.random.default_rng([seed, s])))
    return plan


def synthetic_slides(n_slides: int, seed: int, spec: SynthSpec, positive_rate: float, slides_per_case: int):
    """``(slide_id, case_id, label, features, coords, tumour mask, oracle score)`` of every slide, in order (``spec`` checked first)."""
    spec.check()
    prototypes, direction = _dataset_constants(seed, spec.in_dim)
    for sid, case, label, n, rng in _slide_plan(n_slides, seed, spec, positive_rate, slides_per_case):
        yield sid, case, label, *synthetic_slide(rng, n, bool(label), spec, prototypes, direction)


def synthetic_bags(
    n_slides: int = 20,
    seed: int = 0,
    *,
    in_dim: int = 32,
    min_instances: int = 50,
    max_instances: int = 300,
    positive_fraction: tuple[float, float] = (0.01, 0.10),
    signal: float = 4.0,
    positive_rate: float = 0.5,
    slides_per_case: int = 1,
    return_instance_labels: bool = False,
) -> list[Bag] | tuple[list[Bag], list[np.ndarray]]:
    """In-memory synthetic bags (for tests); same generator as :func:`write_synthetic_dataset`.

    Returns the bags, and with ``return_instance_labels`` also the per-instance
    tumour indicator of each bag.
    """
    spec = SynthSpec(in_dim, min_instances, max_instances, tuple(positive_fraction), signal)
    bags, truth = [], []
    for sid, case, label, feats, coords, tumour, _ in synthetic_slides(n_slides, seed, spec, positive_rate, slides_per_case):
        bags.append(Bag(sid, torch.from_numpy(feats), label, torch.from_numpy(coords.astype(np.float32)), None, case))
        truth.append(tumour)
    return (bags, truth) if return_instance_labels else bags


def write_synthetic_dataset(
    out_dir: str | Path,
    n_slides: int = 40,
    seed: int = 0,
    *,
    in_dim: int = 128,
    min_instances: int = 200,
    max_instances: int = 20_000,
    positive_fraction: tuple[float, float] = (0.01, 0.10),
    signal: float = 4.0,
    positive_rate: float = 0.5,
    slides_per_case: int = 1,
    progress: bool = False,
    preset: str = "default",
    scale: float = 1.0,
) -> Path:
    """Write ``out_dir/features/<slide>.h5`` (CLAM layout: ``features``, ``coords``,
    attributes ``patch_size``/``patch_level``, plus ``instance_labels``, the
    ground-truth tumour mask) and ``out_dir/labels.csv`` (``slide_id,label,case_id``).

    ``preset="camelyon-like"`` uses :mod:`mmil.data.synth_camelyon` (bag sizes 1k-20k times
    ``scale``; ``min_instances``, ``max_instances`` and ``positive_fraction`` are not used). Both presets
    write ``out_dir/oracle.json`` with the AUC of the instance-level oracle (how separable the cohort is).
    Each file is written atomically; ``labels.csv`` last. Returns ``out_dir``.
    """
    import h5py

    spec = SynthSpec(in_dim, min_instances, max_instances, tuple(positive_fraction), signal)
    _check_write_options(spec, n_slides, positive_rate, slides_per_case, preset, scale)
    out_dir = Path(out_dir)
    feat_dir = out_dir / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rows, oracle = [], []
    slides = _preset_slides(preset, n_slides, seed, spec, positive_rate, slides_per_case, scale)
    for sid, case, label, feats, coords, tumour, score in _progress(slides, progress, "synthetic slides", total=n_slides):
        oracle.append(score)
        with atomic_path(feat_dir / f"{sid}.h5") as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=feats)
                dset = f.create_dataset("coords", data=coords)
                f.create_dataset("instance_labels", data=tumour)
                for target in (f, dset):
                    target.attrs["patch_size"] = spec.patch_size
                    target.attrs["patch_level"] = 0
                f.attrs["synthetic_seed"] = seed
        rows.append((sid, label, case))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "case_id"])
    writer.writerows(rows)
    from .synth_camelyon import write_oracle

    write_oracle(out_dir, [r[1] for r in rows], oracle, preset=preset, signal=signal, scale=scale, n_slides=n_slides, seed=seed)
    write_text(out_dir / "labels.csv", buf.getvalue())
    return out_dir


PRESETS = ("default", "camelyon-like")


def _check_write_options(spec: SynthSpec, n_slides: int, positive_rate: float, slides_per_case: int, preset: str, scale: float) -> None:
    spec.check()
    if preset not in PRESETS:
        raise MMILInputError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if not scale > 0:
        raise MMILInputError(f"--scale must be > 0, got {scale}")
    if n_slides < 1:
        raise MMILInputError(f"--n-slides must be >= 1, got {n_slides}")
    if not 0.0 <= positive_rate <= 1.0:
        raise MMILInputError(f"--positive-rate must be in [0, 1], got {positive_rate}")
    if slides_per_case < 1:
        raise MMILInputError(f"--slides-per-case must be >= 1, got {slides_per_case}")


def _preset_slides(preset: str, n_slides: int, seed: int, spec: SynthSpec, positive_rate: float, slides_per_case: int, scale: float):
    """The slides of ``preset`` as ``(slide_id, case_id, label, features, coords, tumour, oracle score)``."""
    if preset == "camelyon-like":
        from .synth_camelyon import CamelyonLikeSpec, camelyon_like_slides

        cspec = CamelyonLikeSpec(in_dim=spec.in_dim, signal=spec.signal, scale=scale)
        yield from camelyon_like_slides(n_slides, seed, cspec, positive_rate, slides_per_case)
        return
    yield from synthetic_slides(n_slides, seed, spec, positive_rate, slides_per_case)
