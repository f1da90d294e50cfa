"""Curvature of the training loss: Hessian operator, SLQ spectrum, Hutchinson trace, Hessian rows, epsilon.

Everything is about the Hessian H of the MEAN loss over all of `data`,

    L(w) = (1/N) sum_b n_b * loss_fn(model(x_b), y_b),    N = sum_b n_b,

with respect to the flattened prunable weights w (D entries; `params` overrides the set).
`data` is an iterable of `(inputs, targets)` batches with a fixed order and no augmentation;
`loss_fn` returns the batch mean (e.g. nn.CrossEntropyLoss()). The model is evaluated in eval
mode (dropout off, batch-norm running statistics), so H is a fixed matrix and every product is
exact. One `HessianOperator` serves SLQ, the trace and the Hessian rows.

Under torch.distributed each rank passes its own shard of the data (`distributed.shard`); every
sum over data is all-reduced as (sum, count), so all ranks get the single-process H v and, from
the same seed, identical Lanczos runs and Ritz values.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .distributed import all_reduce_sum, is_distributed
from .errors import PruneLimitError
from .lanczos import lanczos, tridiag_ritz
from .params import num_weights, resolve_params

__all__ = [
    "HessianOperator",
    "SpectrumEstimate",
    "TraceEstimate",
    "NullMass",
    "slq",
    "hutchinson_trace",
    "hessian_rows",
    "hessian_rows_null_mass",
    "quantile_indices",
    "loss_epsilon",
    "rademacher",
]


# ----------------------------------------------------------------------------- data plumbing
def _move(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Batches to `device`; floating tensors to the parameters' dtype (so a float64 model takes float32 data)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point() and obj.dtype != dtype:
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device=device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


def _batch_size(inputs: Any, targets: Any) -> int:
    for obj in (targets, inputs):
        while isinstance(obj, (list, tuple)) and obj:
            obj = obj[0]
        if isinstance(obj, dict) and obj:
            obj = next(iter(obj.values()))
        if isinstance(obj, torch.Tensor) and obj.ndim >= 1:
            return int(obj.shape[0])
    raise PruneLimitError("cannot tell the batch size: targets or inputs must be tensors with a batch dimension")


def _call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise PruneLimitError(f"batch {index} is not an (inputs, targets) pair; data must yield (inputs, targets)")
    return batch[0], batch[1]


def _fixed_data(data: Iterable) -> Iterable:
    """`data` as a re-iterable, fixed-order sequence of batches (a one-shot iterator is listed once)."""
    if data is None:
        raise PruneLimitError("data is None: pass an iterable of (inputs, targets) batches")
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise PruneLimitError(
            "the DataLoader shuffles; the Hessian needs a fixed pass over the data: build it with shuffle=False"
        )
    if iter(data) is data:  # a generator/iterator can be walked only once
        data = list(data)
    return data


def _check_loss_fn(loss_fn: Callable) -> None:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise PruneLimitError(
            f"loss_fn has reduction={reduction!r}; it must return the batch mean (reduction='mean')"
        )


def _progress(iterable: Iterable, progress: bool, desc: str, total: int | None = None) -> Iterable:
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty())


def _progress_bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _grad_only_for(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """requires_grad on `params` only, so autograd builds no graph for the other parameters."""
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded)."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _finite_or_raise(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise PruneLimitError(
            f"{what} is not finite (NaN or inf); check the model weights, the data and the loss"
        )


# ----------------------------------------------------------------------------- the operator
class HessianOperator:
    """H, the Hessian of the data-mean loss w.r.t. the flattened `params`, as a linear operator.

    `op @ v` (1-D torch tensor or numpy array of length D, or a (D, k) matrix) returns H v in the
    type, dtype and device of `v`; `op.shape == (D, D)`; `op.num_products` counts products;
    `op.gradient()` / `op.loss()` are the full-data mean gradient and loss (from the construction pass).

    How a product is computed (benchmarks/slq_speed.py: 100k-weight MLP over the 1,797 digits
    samples, CPU, one thread; cost of one product in full-data gradient passes, batch 128 / 1797):
    - cached first-order graph (default when it fits in memory; 1.7x / 1.9x): the construction
      pass computes g = sum_b n_b grad L_b with create_graph=True once and keeps that graph; each
      product is then one backward through it with grad_outputs=v (d(g.v)/dw = H v), so no forward
      and no first backward is repeated. The graph (activations and backward intermediates of all
      of `data`) lives as long as the operator; building it costs ~1.2 gradient passes.
    - double backprop per batch (fallback; 2.9x / 2.9x): forward, gradient with create_graph, backward.
    - torch.func forward-over-reverse (jvp of grad; 5.6x / 3.3x) was slowest on CPU and cannot reuse
      work across products, so it is not used.
    All three are exact; they differ only in floating-point summation order.

    cache_graph: None (auto) caches while the bytes autograd saves stay under `cache_max_bytes`
    (default: half of the free memory of `device`) and falls back to double backprop otherwise;
    True caches unconditionally; False never caches.

    The operator is a snapshot: after changing the weights build a new one. With `device`, the
    model is moved there; floating input tensors are cast to the parameters' dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable,
        params: Sequence[torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
        progress: bool = False,
        cache_graph: bool | None = None,
        cache_max_bytes: int | None = None,
        distributed: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise PruneLimitError(f"expected a torch.nn.Module, got {type(model).__name__}")
        _check_loss_fn(loss_fn)
        self.params = resolve_params(model, params)
        if device is not None:
            model.to(device)
        self.model, self.loss_fn, self.data = model, loss_fn, _fixed_data(data)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        if not self.dtype.is_floating_point:
            raise PruneLimitError(f"parameters must be floating point, got {self.dtype}")
        self.dim = num_weights(self.params)
        self.shape = (self.dim, self.dim)
        self.num_products = 0
        self.progress = progress
        self.distributed = is_distributed() if distributed is None else bool(distributed)
        self._graph_grads: list[torch.Tensor] | None = None
        self.cache_bytes = 0
        self._first_pass(cache_graph, cache_max_bytes)

    # -- construction pass: loss, gradient, count, and (maybe) the cached first-order graph
    def _first_pass(self, cache_graph: bool | None, cache_max_bytes: int | None) -> None:
        caching = cache_graph is None or bool(cache_graph)
        budget = None
        if cache_graph is None:
            budget = int(cache_max_bytes) if cache_max_bytes is not None else _available_memory(self.device) // 2
        meter = _SavedBytes(self.params)
        grad_sum: list[torch.Tensor] | None = None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with _eval_mode(self.model), _grad_only_for(self.model, self.params):
            batches = _progress(self.data, self.progress, "Hessian: gradient pass")
            for index, batch in enumerate(batches):
                inputs, targets = _unpack(batch, index)
                n_b = _batch_size(inputs, targets)
                inputs, targets = _move((inputs, targets), self.device, self.dtype)
                ctx = meter.hooks() if caching else contextlib.nullcontext()
                with ctx:
                    loss = self.loss_fn(_call_model(self.model, inputs), targets)
                    if loss.ndim != 0:
                        raise PruneLimitError("loss_fn must return a scalar (the batch mean)")
                    _finite_or_raise(loss.detach(), f"the training loss on batch {index}")
                    grads = self._grad(loss * n_b, create_graph=caching)
                if caching:
                    grad_sum = grads if grad_sum is None else [a + b for a, b in zip(grad_sum, grads)]
                    if budget is not None and meter.bytes > budget:
                        # Too big to keep: drop the graph, carry on with plain gradients.
                        caching = False
                        grad_sum = [g.detach() for g in grad_sum]
                else:
                    grads = [g.detach() for g in grads]
                    grad_sum = grads if grad_sum is None else [a.add_(b) for a, b in zip(grad_sum, grads)]
                loss_sum += loss.detach().to(torch.float64) * n_b
                count += n_b
        if grad_sum is None:
            grad_sum = [torch.zeros_like(p) for p in self.params]
        stats = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        self._reduce(stats)
        self.num_samples = int(round(float(stats[1])))
        if self.num_samples == 0:
            raise PruneLimitError("data is empty: the Hessian needs at least one (inputs, targets) batch")
        self._loss = float(stats[0]) / self.num_samples
        flat_grad = torch.cat([g.detach().reshape(-1) for g in grad_sum])
        self._gradient = self._reduce(flat_grad.clone()) / self.num_samples
        if caching:
            self._graph_grads = grad_sum
            self.cache_bytes = meter.bytes
        self.cached = caching

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if self.distributed else t

    def _grad(self, scalar: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(scalar, self.params, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]

    def _backward_of(self, grads: Sequence[torch.Tensor], chunks: Sequence[torch.Tensor],
                     retain_graph: bool) -> list[torch.Tensor]:
        """sum_i d(g_i . v_i)/dw: a gradient with grad_outputs = v, i.e. H v for g = dL/dw."""
        pairs = [(g, v) for g, v in zip(grads, chunks) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        try:
            hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                                     retain_graph=retain_graph, allow_unused=True)
        except RuntimeError as err:
            if "inplace operation" in str(err):
                raise PruneLimitError(
                    "the model's weights changed after the HessianOperator was built; build a new operator"
                ) from None
            raise
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)]

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    # -- products
    def _hvp(self, v: torch.Tensor) -> torch.Tensor:
        chunks = self._split(v)
        if self._graph_grads is not None:
            hv = self._backward_of(self._graph_grads, chunks, retain_graph=True)
        else:
            hv = [torch.zeros_like(p) for p in self.params]
            with _eval_mode(self.model), _grad_only_for(self.model, self.params):
                for index, batch in enumerate(self.data):
                    inputs, targets = _unpack(batch, index)
                    n_b = _batch_size(inputs, targets)
                    inputs, targets = _move((inputs, targets), self.device, self.dtype)
                    loss = self.loss_fn(_call_model(self.model, inputs), targets)
                    _finite_or_raise(loss.detach(), f"the training loss on batch {index}")
                    grads = self._grad(loss * n_b, create_graph=True)
                    for acc, h in zip(hv, self._backward_of(grads, chunks, retain_graph=False)):
                        acc.add_(h)
        flat = torch.cat([h.reshape(-1) for h in hv])
        flat = self._reduce(flat) / self.num_samples
        _finite_or_raise(flat, "a Hessian-vector product")
        self.num_products += 1
        return flat

    def matvec(self, v):
        """H v for a 1-D vector of length D (torch tensor or numpy array); returns the same kind."""
        as_numpy = isinstance(v, np.ndarray)
        t = torch.as_tensor(v)
        if t.ndim != 1 or t.numel() != self.dim:
            raise PruneLimitError(f"vector has shape {tuple(t.shape)}, expected ({self.dim},)")
        out = self._hvp(t.detach().to(device=self.device, dtype=self.dtype))
        if as_numpy:
            return out.detach().cpu().numpy().astype(np.asarray(v).dtype, copy=False)
        return out.to(device=t.device, dtype=t.dtype)

    def __matmul__(self, v):
        if getattr(v, "ndim", 1) == 2:
            cols = [self.matvec(v[:, j]) for j in range(v.shape[1])]
            return np.stack(cols, axis=1) if isinstance(v, np.ndarray) else torch.stack(cols, dim=1)
        return self.matvec(v)

    __call__ = matvec

    def gradient(self) -> torch.Tensor:
        """Full-data mean gradient dL/dw (flattened, on the operator's device)."""
        return self._gradient.clone()

    def loss(self) -> float:
        """Full-data mean loss L(w)."""
        return self._loss

    def to_scipy(self):
        """A scipy.sparse.linalg.LinearOperator (float64) over this operator, e.g. for eigsh."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=lambda x: self.matvec(np.asarray(x, np.float64).reshape(-1)),
                              rmatvec=lambda x: self.matvec(np.asarray(x, np.float64).reshape(-1)), dtype=np.float64)

    def free(self) -> None:
        """Drop the cached graph (later products fall back to double backprop)."""
        self._graph_grads = None
        self.cached = False

    def __repr__(self) -> str:
        return (f"HessianOperator(D={self.dim}, N={self.num_samples}, cached={self.cached}, "
                f"products={self.num_products}, device={self.device}, dtype={self.dtype})")


def _operator(model, loss_fn, data, params, **kwargs) -> HessianOperator:
    """`model` itself when it is already an operator, else a new one."""
    if isinstance(model, HessianOperator):
        return model
    return HessianOperator(model, loss_fn, data, params, **kwargs)


def rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A vector of independent +-1 entries (on CPU), drawn from `generator`."""
    return torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)


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
        """Gaussian-smoothed density on `grid` (for plots only):
        phi(t) = mean_k sum_j tau_kj N(t; theta_kj, sigma^2)."""
        grid = np.asarray(grid, dtype=np.float64)
        if sigma <= 0:
            raise PruneLimitError(f"sigma must be positive, got {sigma}")
        z = (grid.reshape(-1, 1) - self.nodes.reshape(1, -1)) / sigma
        dens = np.exp(-0.5 * z * z) @ self.weights.reshape(-1) / (sigma * math.sqrt(2 * math.pi) * self.num_probes)
        return dens.reshape(grid.shape)

    def truncated(self, num_steps: int) -> "SpectrumEstimate":
        """The estimate an SLQ run of `num_steps` steps (same probes) would have given."""
        m = int(num_steps)
        if not 1 <= m <= self.num_steps:
            raise PruneLimitError(f"num_steps must be in [1, {self.num_steps}], got {num_steps}")
        alphas = [a[:m] for a in self.alphas]
        betas = [b[: len(a) - 1] for a, b in zip(alphas, self.betas)]
        nodes, weights = _pad_ritz(alphas, betas, m)
        return SpectrumEstimate(nodes, weights, self.dim, m, self.seed, sum(len(a) for a in alphas),
                                [len(a) for a in alphas], alphas, betas)

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


def _pad_ritz(alphas: Sequence[np.ndarray], betas: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.zeros((len(alphas), width))
    weights = np.zeros((len(alphas), width))
    for k, (a, b) in enumerate(zip(alphas, betas)):
        theta, tau = tridiag_ritz(a, b)
        nodes[k, : len(theta)] = theta
        weights[k, : len(tau)] = tau
    return nodes, weights


def slq(model, loss_fn, data, num_steps: int = 100, num_probes: int = 1, seed: int = 0, params=None, *,
        progress: bool = False, stop_when: Callable[[np.ndarray, np.ndarray], bool] | None = None,
        reorthogonalize: bool | str = True, **operator_kwargs) -> SpectrumEstimate:
    """Stochastic Lanczos quadrature of H (the data-mean loss Hessian w.r.t. `params`).

    For each of `num_probes` Rademacher probes v (entries +-1/sqrt(D), drawn from
    torch.Generator().manual_seed(seed)), `num_steps` Lanczos steps with full reorthogonalization
    give T_m; its Ritz values and squared first eigenvector components (float64) are the nodes
    and weights. `model` may also be a ready HessianOperator (then loss_fn and data are ignored).
    `stop_when(alpha, beta) -> bool` may end a probe early (e.g. geometry.ThresholdConvergence;
    its `reset()` is called before every probe). Extra keyword arguments go to HessianOperator.
    """
    if num_probes < 1 or num_steps < 1:
        raise PruneLimitError(f"num_steps and num_probes must be >= 1, got {num_steps}, {num_probes}")
    op = _operator(model, loss_fn, data, params, progress=progress, **operator_kwargs)
    start_products = op.num_products
    width = min(int(num_steps), op.dim)
    generator = torch.Generator().manual_seed(int(seed))
    alphas, betas = [], []
    bar = _progress_bar(progress, num_probes * width, "SLQ Lanczos steps")

    for _ in range(num_probes):
        v = rademacher(op.dim, generator).div_(math.sqrt(op.dim)).to(op.device)
        if stop_when is not None and hasattr(stop_when, "reset"):
            stop_when.reset()

        def step(alpha: np.ndarray, beta: np.ndarray) -> bool:
            if bar is not None:
                bar.update(1)
            return bool(stop_when(alpha, beta)) if stop_when is not None else False

        a, b = lanczos(op.matvec, op.dim, width, v, reorthogonalize=reorthogonalize, dtype=torch.float64,
                       callback=step)
        alphas.append(a)
        betas.append(b)
    if bar is not None:
        bar.close()
    nodes, weights = _pad_ritz(alphas, betas, width)
    return SpectrumEstimate(nodes, weights, op.dim, width, int(seed), op.num_products - start_products,
                            [len(a) for a in alphas], alphas, betas)


# ----------------------------------------------------------------------------- trace
@dataclass
class TraceEstimate:
    """Hutchinson estimate of Tr(H): mean of z^T H z over Rademacher z, its standard error, the samples."""

    mean: float
    stderr: float
    samples: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "stderr": self.stderr, "samples": np.asarray(self.samples).tolist()}


def hutchinson_trace(model, loss_fn, data, num_samples: int, seed: int = 0, params=None, *,
                     progress: bool = False, **operator_kwargs) -> TraceEstimate:
    """Tr(H) ~= (1/n) sum_s z_s^T H z_s, z_s with independent +-1 entries (E[z z^T] = I).

    stderr = sample standard deviation (ddof=1) / sqrt(n) (NaN for n = 1). `model` may be a
    HessianOperator.
    """
    if num_samples < 1:
        raise PruneLimitError(f"num_samples must be >= 1, got {num_samples}")
    op = _operator(model, loss_fn, data, params, progress=progress, **operator_kwargs)
    generator = torch.Generator().manual_seed(int(seed))
    samples = np.empty(num_samples)
    for s in _progress(range(num_samples), progress, "Hutchinson trace"):
        z = rademacher(op.dim, generator, op.dtype).to(op.device)
        samples[s] = float(torch.dot(z.to(torch.float64), op.matvec(z).to(torch.float64)))
    stderr = float(samples.std(ddof=1) / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(float(samples.mean()), stderr, samples)


# ----------------------------------------------------------------------------- rows and null mass
def hessian_rows(op_or_model, indices: Sequence[int], loss_fn=None, data=None, params=None, *,
                 progress: bool = False, **operator_kwargs) -> np.ndarray:
    """Rows H[i, :] = (H e_i)^T for each i in `indices` (H symmetric), float64 array (len(indices), D)."""
    op = _operator(op_or_model, loss_fn, data, params, progress=progress, **operator_kwargs)
    idx = _check_indices(indices, op.dim)
    rows = np.empty((len(idx), op.dim))
    for r, i in enumerate(_progress(idx, progress, "Hessian rows")):
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
    """p0: the fraction of sampled Hessian rows whose L1 norm is below `threshold` (spec §3)."""

    p0: float
    row_l1_norms: np.ndarray
    indices: np.ndarray
    quantiles: np.ndarray
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {"p0": self.p0, "row_l1_norms": self.row_l1_norms.tolist(), "indices": self.indices.tolist(),
                "quantiles": self.quantiles.tolist(), "threshold": self.threshold}


def hessian_rows_null_mass(model, loss_fn, data, params=None, quantiles=np.arange(1, 100) / 100,
                           threshold: float = 1e-7, *, progress: bool = False, **operator_kwargs) -> NullMass:
    """Null mass p0 (spec §3): take the weights at the given magnitude quantiles (default 1%..99%),
    compute each one's Hessian row H e_i (one product each; rows are reduced to their L1 norm, never
    stored), and p0 = (number of rows with ||H e_i||_1 < threshold) / (number of rows).
    `model` may be a HessianOperator."""
    op = _operator(model, loss_fn, data, params, progress=progress, **operator_kwargs)
    with torch.no_grad():
        w = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in op.params]).numpy()
    quantiles = np.asarray(quantiles, dtype=np.float64)
    idx = quantile_indices(w, quantiles)
    norms_by_index: dict[int, float] = {}
    for i in _progress(idx.tolist(), progress, "Hessian rows (null mass)"):
        if i not in norms_by_index:
            norms_by_index[i] = float(_row(op, i).abs().sum())
    norms = np.array([norms_by_index[i] for i in idx.tolist()])
    return NullMass(float(np.mean(norms < threshold)), norms, idx, quantiles, float(threshold))


# ----------------------------------------------------------------------------- epsilon
def loss_epsilon(model: nn.Module, loss_fn: Callable, data: Iterable, *, ddof: int = 0,
                 device: torch.device | str | None = None, progress: bool = False,
                 distributed: bool | None = None) -> float:
    """eps = standard deviation of the per-batch training loss over one pass, in eval mode.

    eps = sqrt( sum_b (L_b - mean L)^2 / (B - ddof) ) over the B batches of `data` (the caller
    supplies batches of 128, no augmentation). Under torch.distributed each rank passes its shard;
    (sum, count) and then the squared deviations are all-reduced, so all ranks get the
    single-process value.
    """
    _check_loss_fn(loss_fn)
    data = _fixed_data(data)
    if device is not None:
        model.to(device)
    params = list(model.parameters())
    dev = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    dtype = params[0].dtype if params else None
    dist_on = is_distributed() if distributed is None else bool(distributed)
    losses = []
    with _eval_mode(model), torch.no_grad():
        for index, batch in enumerate(_progress(data, progress, "loss epsilon")):
            inputs, targets = _unpack(batch, index)
            inputs, targets = _move((inputs, targets), dev, dtype)
            loss = loss_fn(_call_model(model, inputs), targets)
            _finite_or_raise(loss, f"the training loss on batch {index}")
            losses.append(loss.to(torch.float64))
    local = torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64, device=dev)
    stats = torch.stack([local.sum(), torch.tensor(float(local.numel()), dtype=torch.float64, device=dev)])
    if dist_on:
        all_reduce_sum(stats)
    count = int(round(float(stats[1])))
    if count - ddof <= 0:
        raise PruneLimitError(f"loss_epsilon needs more than {ddof} batches, got {count}")
    mean = stats[0] / count
    sq = ((local - mean) ** 2).sum().reshape(1)
    if dist_on:
        all_reduce_sum(sq)
    return float(torch.sqrt(sq[0] / (count - ddof)))
