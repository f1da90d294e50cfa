"""``mmil synth --preset camelyon-like``: a cohort shaped like CAMELYON16, with a known oracle.

Per slide (everything a pure function of the seed):

* bag size log-uniform in 1,000-20,000 instances, times ``scale`` (``--scale 0.05`` gives
  50-1,000 for a CPU), on a tissue-shaped patch grid (:func:`mmil.data.synth._tissue_cells`);
* six tissue types, each a shared prototype; the slide's mixture proportions are drawn from
  Dirichlet(0.7), and 6-15 spatially coherent (Voronoi) regions take their type from them;
* a per-slide stain/scanner offset (normal, std ``stain_std`` per feature) and Gaussian noise;
* positives: a tumour fraction drawn like CAMELYON16's (55 % micro-metastases, log-uniform
  0.1-1 %; 30 % 1-10 %; 15 % 10-40 %; at least one instance), as 1-3 contiguous lesions (the
  cells nearest to each focus), shifted by ``signal`` along one tumour direction.

``instance_labels`` (the tumour mask) is saved in every file. The **oracle** scores an
instance by the projection on the tumour direction of its feature minus its slide's stain
offset and its tissue prototype (the exact tumour evidence under this model) and a slide by
its largest instance score; its AUC, written to ``oracle.json``, says how separable a cohort is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..stats import binary_auc
from .synth import _tissue_cells

N_TYPES = 6
#: (probability, low, high) of the tumour fraction of a positive slide (log-uniform within a bin).
FRACTION_BINS = ((0.55, 0.001, 0.01), (0.30, 0.01, 0.10), (0.15, 0.10, 0.40))


@dataclass(frozen=True)
class CamelyonLikeSpec:
    in_dim: int = 128
    signal: float = 4.0
    scale: float = 1.0
    stain_std: float = 0.7
    noise_std: float = 1.0
    patch_size: int = 256

    def size_range(self) -> tuple[int, int]:
        return max(20, int(round(1000 * self.scale))), max(40, int(round(20000 * self.scale)))


def tumour_fraction(rng: np.random.Generator) -> float:
    """A positive slide's tumour share, drawn from :data:`FRACTION_BINS`."""
    probs = np.array([b[0] for b in FRACTION_BINS])
    _, lo, hi = FRACTION_BINS[int(rng.choice(len(FRACTION_BINS), p=probs / probs.sum()))]
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _lesions(rng: np.random.Generator, cells: np.ndarray, n_tumour: int) -> np.ndarray:
    """Tumour mask of ``n_tumour`` cells in 1-3 contiguous lesions."""
    n = len(cells)
    tumour = np.zeros(n, dtype=bool)
    n_foci = 1 if n_tumour < 10 else int(rng.integers(1, 4))
    for share in np.array_split(np.arange(n_tumour), n_foci):
        dist = ((cells - cells[rng.integers(n)]) ** 2).sum(1).astype(np.float64)
        dist[tumour] = np.inf
        tumour[np.argsort(dist, kind="stable")[: len(share)]] = True
    return tumour


def camelyon_like_slide(rng: np.random.Generator, n: int, positive: bool, spec: CamelyonLikeSpec, prototypes: np.ndarray,
                        direction: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(features (n, C) float32, coords (n, 2) pixels, tumour mask uint8, oracle slide score)``."""
    cells = _tissue_cells(rng, n)
    mix = rng.dirichlet(np.full(N_TYPES, 0.7))
    n_regions = min(int(rng.integers(6, 16)), n)
    seeds = cells[rng.choice(n, size=n_regions, replace=False)]
    region = np.argmin(((cells[:, None, :] - seeds[None, :, :]) ** 2).sum(-1), axis=1)
    types = rng.choice(N_TYPES, size=n_regions, p=mix)[region]
    stain = rng.normal(0.0, spec.stain_std, size=spec.in_dim)
    noise = rng.normal(0.0, spec.noise_std, size=(n, spec.in_dim))
    tumour = np.zeros(n, dtype=bool)
    if positive:
        tumour = _lesions(rng, cells, max(1, int(round(tumour_fraction(rng) * n))))
    residual = noise + np.outer(tumour, spec.signal * direction)
    features = prototypes[types] + stain + residual
    oracle = float((residual @ direction).max())
    return features.astype(np.float32), cells * spec.patch_size, tumour.astype(np.uint8), oracle


def camelyon_like_constants(seed: int, in_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue prototypes ``(6, C)`` (std 1.5 per feature) and the unit tumour direction."""
    rng = np.random.default_rng([seed, 104729])
    prototypes = rng.normal(0.0, 1.5, size=(N_TYPES, in_dim))
    direction = rng.normal(size=in_dim)
    return prototypes, direction / np.linalg.norm(direction)


def camelyon_like_slides(n_slides: int, seed: int, spec: CamelyonLikeSpec, positive_rate: float, slides_per_case: int):
    """``(slide_id, case_id, label, features, coords, tumour, oracle score)`` of every slide, in order."""
    from .synth import SynthSpec, _slide_plan

    lo, hi = spec.size_range()
    prototypes, direction = camelyon_like_constants(seed, spec.in_dim)
    for sid, case, label, n, rng in _slide_plan(n_slides, seed, SynthSpec(spec.in_dim, lo, hi), positive_rate, slides_per_case):
        feats, coords, tumour, oracle = camelyon_like_slide(rng, n, bool(label), spec, prototypes, direction)
        yield sid, case, label, feats, coords, tumour, oracle


def oracle_auc(labels: list[int], scores: list[float]) -> float:
    """AUC of the instance-level oracle's slide scores (nan without both classes)."""
    return binary_auc(np.asarray(labels) == 1, np.asarray(scores, dtype=np.float64))


def write_oracle(out_dir, labels: list[int], scores: list[float], **settings) -> float:
    """Write ``out_dir/oracle.json`` (the oracle AUC and the cohort's settings); return the AUC."""
    from pathlib import Path

    from mmpl.jsonio import write_json

    auc = oracle_auc(labels, scores)
    write_json(Path(out_dir) / "oracle.json", {"oracle_auc": auc, **settings})
    return auc
