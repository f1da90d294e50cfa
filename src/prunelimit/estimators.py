"""Curvature estimates from a Hessian operator: SLQ spectrum, Hutchinson trace, Hessian rows, null mass.

Every estimator takes a :class:`~prunelimit.hessian.HessianOperator` (build one with
:func:`~prunelimit.hessian.hessian_operator`), so one gradient pass over the data (and, when it
fits, one cached graph) serves all of them. Probes are drawn on the CPU from
``torch.Generator().manual_seed(seed)``, so every rank and every device draws the same ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mmpl.progress import progress as progress_over, progress_bar

from .errors import PruneLimitError
from .hessian import HessianOperator, require_operator
from .lanczos import lanczos, tridiag_ritz
from .params import weights_vector

__all__ = [
    "SpectrumEstimate",
    "TraceEstimate",
    "NullMass",
    "slq",
    "hutchinson_trace",
    "hessian_rows",
    "hessian_rows_null_mass",
    "quantile_indices",
    "rademacher",
    "spectral_density",
]


def rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A vector of independent +-1 entries (on CPU), drawn from `generator`."""
    return torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)


def spectral_density(nodes, weights, grid, sigma: float) -> np.ndarray:
    """Gaussian-smoothed SLQ density on `grid` (for plots only; the prediction uses the raw quadrature):

    phi(t) = mean_k sum_j tau_kj N(t; theta_kj, sigma^2), nodes/weights of shape (probes, m) (or 1-D: one probe).
    """
    grid = np.asarray(grid, dtype=np.float64)
    if sigma <= 0:
        raise PruneLimitError(f"sigma must be positive, got {sigma}")
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    z = (grid.reshape(-1, 1) - nodes.reshape(1, -1)) / sigma
    dens = np.exp(-0.5 * z * z) @ weights.reshape(-1) / (sigma * math.sqrt(2 * math.pi) * nodes.shape[0])
    return dens.reshape(grid.shape)


# ----------------------------------------------------------------------------- SLQ
@dataclass
class SpectrumEstimate:
    """Stochastic Lanczos quadrature of the Hessian's spectral measure.

    nodes[k, j], weights[k, j]: Ritz value theta_j and Gauss weight tau_j of probe k, shape
    (num_probes, num_steps); a probe that stopped early (breakdown or `stop_when`) is padded with
    node 0 and weight 0. For any f, (1/D) tr f(H) ~= mean_k sum_j weights[k, j] f(nodes[k, j]).
    alphas/betas keep each probe's tridiagonal matrix, so shorter runs can be re-derived
    (`truncated`).
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    num_steps: int
    seed: int = 0
    num_products: int = 0
    steps: list[int] = field(default_factory=list)
    alphas: list[np.ndarray] = field(default_factory=list)
    betas: list[np.ndarray] = field(default_factory=list)

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def density(self, grid, sigma: float) -> np.ndarray:
        """Gaussian-smoothed density on `grid` (for plots only); see :func:`spectral_density`."""
        return spectral_density(self.nodes, self.weights, grid, sigma)

    def truncated(self, num_steps: int) -> "SpectrumEstimate":
        """The estimate an SLQ run of `num_steps` steps (same probes) would have given."""
        m = int(num_steps)
        if not 1 <= m <= self.num_steps:
            raise PruneLimitError(f"num_steps must be in [1, {self.num_steps}], got {num_steps}")
        alphas = [a[:m] for a in self.alphas]
        betas = [b[: len(a) - 1] for a, b in zip(alphas, self.betas)]
        return _estimate(alphas, betas, self.dim, m, self.seed, sum(len(a) for a in alphas))

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes.tolist(), "weights": self.weights.tolist(), "dim": self.dim,
            "num_steps": self.num_steps, "seed": self.seed, "num_products": self.num_products,
            "steps": list(self.steps), "alphas": [a.tolist() for a in self.alphas],
            "betas": [b.tolist() for b in self.betas],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpectrumEstimate":
        try:
            return cls(
                nodes=np.asarray(d["nodes"], dtype=np.float64), weights=np.asarray(d["weights"], dtype=np.float64),
                dim=int(d["dim"]), num_steps=int(d["num_steps"]), seed=int(d.get("seed", 0)),
                num_products=int(d.get("num_products", 0)), steps=[int(s) for s in d.get("steps", [])],
                alphas=[np.asarray(a, dtype=np.float64) for a in d.get("alphas", [])],
                betas=[np.asarray(b, dtype=np.float64) for b in d.get("betas", [])],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PruneLimitError(f"not a spectrum record (missing or bad field: {err})") from None


def _estimate(alphas: Sequence[np.ndarray], betas: Sequence[np.ndarray], dim: int, width: int, seed: int,
              num_products: int) -> SpectrumEstimate:
    """The SpectrumEstimate of per-probe tridiagonals, Ritz values padded to `width` columns."""
    nodes = np.zeros((len(alphas), width))
    weights = np.zeros((len(alphas), width))
    for k, (a, b) in enumerate(zip(alphas, betas)):
        theta, tau = tridiag_ritz(a, b)
        nodes[k, : len(theta)] = theta
        weights[k, : len(tau)] = tau
    return SpectrumEstimate(nodes, weights, dim, width, int(seed), num_products, [len(a) for a in alphas],
                            list(alphas), list(betas))


def slq(op: HessianOperator, num_steps: int = 100, num_probes: int = 1, seed: int = 0, *, progress: bool = False,
        stop_when: Callable[[np.ndarray, np.ndarray], bool] | None = None,
        reorthogonalize: bool | str = True) -> SpectrumEstimate:
    """Stochastic Lanczos quadrature of the Hessian operator `op`.

    For each of `num_probes` Rademacher probes v (entries +-1/sqrt(D), drawn from
    torch.Generator().manual_seed(seed)), `num_steps` Lanczos steps with full reorthogonalization
    give T_m; its Ritz values and squared first eigenvector components (float64) are the nodes
    and weights. `stop_when(alpha, beta) -> bool` may end a probe early (e.g.
    geometry.ThresholdConvergence; its `reset()` is called before every probe).
    """
    op = require_operator(op, "slq")
    if num_probes < 1 or num_steps < 1:
        raise PruneLimitError(f"num_steps and num_probes must be >= 1, got {num_steps}, {num_probes}")
    start_products = op.num_products
    width = min(int(num_steps), op.dim)
    generator = torch.Generator().manual_seed(int(seed))
    alphas, betas = [], []
    bar = progress_bar(progress, num_probes * width, "SLQ Lanczos steps")

    def step(alpha: np.ndarray, beta: np.ndarray) -> bool:
        if bar is not None:
            bar.update(1)
        return bool(stop_when(alpha, beta)) if stop_when is not None else False

    for _ in range(num_probes):
        v = rademacher(op.dim, generator).div_(math.sqrt(op.dim)).to(op.device)
        if stop_when is not None and hasattr(stop_when, "reset"):
            stop_when.reset()
        a, b = lanczos(op.matvec, op.dim, width, v, reorthogonalize=reorthogonalize, dtype=torch.float64,
                       callback=step)
        alphas.append(a)
        betas.append(b)
    if bar is not None:
        bar.close()
    return _estimate(alphas, betas, op.dim, width, seed, op.num_products - start_products)


# ----------------------------------------------------------------------------- trace
@dataclass
class TraceEstimate:
    """Hutchinson estimate of Tr(H): mean of z^T H z over Rademacher z, its standard error, the samples."""

    mean: float
    stderr: float
    samples: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "stderr": self.stderr, "samples": np.asarray(self.samples).tolist()}


def hutchinson_trace(op: HessianOperator, num_samples: int, seed: int = 0, *, progress: bool = False) -> TraceEstimate:
    """Tr(H) ~= (1/n) sum_s z_s^T H z_s, z_s with independent +-1 entries (E[z z^T] = I).

    stderr = sample standard deviation (ddof=1) / sqrt(n) (NaN for n = 1).
    """
    op = require_operator(op, "hutchinson_trace")
    if num_samples < 1:
        raise PruneLimitError(f"num_samples must be >= 1, got {num_samples}")
    generator = torch.Generator().manual_seed(int(seed))
    samples = np.empty(num_samples)
    for s in progress_over(range(num_samples), progress, "Hutchinson trace"):
        z = rademacher(op.dim, generator, op.dtype).to(op.device)
        samples[s] = float(torch.dot(z.to(torch.float64), op.matvec(z).to(torch.float64)))
    stderr = float(samples.std(ddof=1) / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(float(samples.mean()), stderr, samples)


# ----------------------------------------------------------------------------- rows and null mass
def hessian_rows(op: HessianOperator, indices: Sequence[int], *, progress: bool = False) -> np.ndarray:
    """Rows H[i, :] = (H e_i)^T for each i in `indices` (H symmetric), float64 array (len(indices), D)."""
    op = require_operator(op, "hessian_rows")
    idx = _check_indices(indices, op.dim)
    rows = np.empty((len(idx), op.dim))
    for r, i in enumerate(progress_over(idx, progress, "Hessian rows")):
        rows[r] = _row(op, int(i)).cpu().numpy()
    return rows


def _row(op: HessianOperator, i: int) -> torch.Tensor:
    e = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
    e[i] = 1
    return op.matvec(e).to(torch.float64)


def _check_indices(indices, dim: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= dim):
        raise PruneLimitError(f"row indices must be in [0, {dim}), got range [{idx.min()}, {idx.max()}]")
    return idx


def quantile_indices(weights: np.ndarray, quantiles) -> np.ndarray:
    """Index of the weight at each magnitude quantile q: the floor(q D)-th smallest |w| (stable order)."""
    w = np.abs(np.asarray(weights, dtype=np.float64).reshape(-1))
    q = np.asarray(quantiles, dtype=np.float64).reshape(-1)
    if q.size == 0 or (q < 0).any() or (q >= 1).any():
        raise PruneLimitError("quantiles must be non-empty and in [0, 1)")
    order = np.argsort(w, kind="stable")
    return order[np.minimum(np.floor(q * w.size).astype(np.int64), w.size - 1)]


@dataclass
class NullMass:
    """p0: the fraction of sampled Hessian rows whose L1 norm is below `threshold` (docs/method/prunelimit.md §3.3)."""

    p0: float
    row_l1_norms: np.ndarray
    indices: np.ndarray
    quantiles: np.ndarray
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {"p0": self.p0, "row_l1_norms": self.row_l1_norms.tolist(), "indices": self.indices.tolist(),
                "quantiles": self.quantiles.tolist(), "threshold": self.threshold}


def hessian_rows_null_mass(op: HessianOperator, quantiles=np.arange(1, 100) / 100, threshold: float = 1e-7, *,
                           progress: bool = False) -> NullMass:
    """Null mass p0 (docs/method/prunelimit.md §3.3): take the weights at the given magnitude quantiles
    (default 1%..99%), compute each one's Hessian row H e_i (one product each; rows are reduced to
    their L1 norm, never stored), and p0 = (number of rows with ||H e_i||_1 < threshold) / (number of rows)."""
    op = require_operator(op, "hessian_rows_null_mass")
    quantiles = np.asarray(quantiles, dtype=np.float64)
    idx = quantile_indices(weights_vector(op.params), quantiles)
    norms_by_index: dict[int, float] = {}
    for i in progress_over(idx.tolist(), progress, "Hessian rows (null mass)"):
        if i not in norms_by_index:
            norms_by_index[i] = float(_row(op, i).abs().sum())
    norms = np.array([norms_by_index[i] for i in idx.tolist()])
    return NullMass(float(np.mean(norms < threshold)), norms, idx, quantiles, float(threshold))
