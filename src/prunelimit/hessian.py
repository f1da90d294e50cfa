"""The Hessian of the training loss as a linear operator: what every curvature estimator takes.

Everything is about the Hessian H of the MEAN loss over all of `data`,

    L(w) = (1/N) sum_b n_b * loss_fn(model(x_b), y_b),    N = sum_b n_b,

with respect to the flattened prunable weights w (D entries; `params` overrides the set).
`data` is an iterable of `(inputs, targets)` batches with a fixed order and no augmentation;
`loss_fn` returns the batch mean (e.g. nn.CrossEntropyLoss()). The model is evaluated in eval
mode (dropout off, batch-norm running statistics), so H is a fixed matrix and every product is
exact. Build it with :func:`hessian_operator`; one operator serves SLQ, the trace, the Hessian
rows and the null mass (:mod:`prunelimit.estimators`).

Under torch.distributed each rank passes its own shard of the data (`distributed.shard`); every
sum over data is all-reduced as (sum, count), so all ranks get the single-process H v and, from
the same seed, identical Lanczos runs and Ritz values.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .batches import batch_loss, check_loss_fn, eval_mode, finite_or_raise, fixed_batches, grad_only_for, prepared_batches
from .distributed import all_reduce_sum, is_distributed
from .errors import PruneLimitError
from .memory import SavedBytes, available_memory
from .params import num_weights, resolve_params

__all__ = ["HessianOperator", "hessian_operator", "require_operator"]


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
        check_loss_fn(loss_fn)
        self.params = resolve_params(model, params)
        if device is not None:
            model.to(device)
        self.model, self.loss_fn, self.data = model, loss_fn, fixed_batches(data)
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
            budget = int(cache_max_bytes) if cache_max_bytes is not None else available_memory(self.device) // 2
        meter = SavedBytes(self.params)
        grad_sum: list[torch.Tensor] | None = None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with eval_mode(self.model), grad_only_for(self.model, self.params):
            batches = prepared_batches(self.data, self.device, self.dtype, progress=self.progress,
                                       desc="Hessian: gradient pass")
            for index, n_b, inputs, targets in batches:
                with meter.hooks() if caching else contextlib.nullcontext():
                    loss = batch_loss(self.model, self.loss_fn, inputs, targets, index)
                    grads = self._grad(loss * n_b, create_graph=caching)
                grad_sum = _accumulate(grad_sum, grads, keep_graph=caching)
                if caching and budget is not None and meter.bytes > budget:
                    # Too big to keep: drop the graph, carry on with plain gradients.
                    caching = False
                    grad_sum = [g.detach() for g in grad_sum]
                loss_sum += loss.detach().to(torch.float64) * n_b
                count += n_b
        self._set_totals(grad_sum, loss_sum, count)
        if caching:
            self._graph_grads = grad_sum
            self.cache_bytes = meter.bytes
        self.cached = caching

    def _set_totals(self, grad_sum: list[torch.Tensor] | None, loss_sum: torch.Tensor, count: int) -> None:
        """Full-data sample count, mean loss and mean gradient (all-reduced over ranks)."""
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
            with eval_mode(self.model), grad_only_for(self.model, self.params):
                for index, n_b, inputs, targets in prepared_batches(self.data, self.device, self.dtype):
                    loss = batch_loss(self.model, self.loss_fn, inputs, targets, index)
                    grads = self._grad(loss * n_b, create_graph=True)
                    for acc, h in zip(hv, self._backward_of(grads, chunks, retain_graph=False)):
                        acc.add_(h)
        flat = torch.cat([h.reshape(-1) for h in hv])
        flat = self._reduce(flat) / self.num_samples
        finite_or_raise(flat, "a Hessian-vector product")
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


def _accumulate(total: list[torch.Tensor] | None, grads: list[torch.Tensor], keep_graph: bool) -> list[torch.Tensor]:
    """total + grads per tensor: out of place while the graph is kept, else detached and in place."""
    if keep_graph:
        return grads if total is None else [a + b for a, b in zip(total, grads)]
    grads = [g.detach() for g in grads]
    return grads if total is None else [a.add_(b) for a, b in zip(total, grads)]


def hessian_operator(model: nn.Module, loss_fn: Callable, batches: Iterable,
                     params: Sequence[torch.Tensor] | None = None, *, device: torch.device | str | None = None,
                     progress: bool = False, cache_graph: bool | None = None, cache_max_bytes: int | None = None,
                     distributed: bool | None = None) -> HessianOperator:
    """The Hessian of the mean of `loss_fn` over `batches` w.r.t. `params` (default: the prunable weights).

    This is what :func:`~prunelimit.slq`, :func:`~prunelimit.hutchinson_trace`,
    :func:`~prunelimit.hessian_rows` and :func:`~prunelimit.hessian_rows_null_mass` take. It runs
    one gradient pass over `batches` now; see :class:`HessianOperator` for the options.
    """
    return HessianOperator(model, loss_fn, batches, params, device=device, progress=progress, cache_graph=cache_graph,
                           cache_max_bytes=cache_max_bytes, distributed=distributed)


def require_operator(op, what: str) -> HessianOperator:
    """`op` itself when it is a :class:`HessianOperator`; else an error that says how to build one."""
    if not isinstance(op, HessianOperator):
        raise PruneLimitError(f"{what} takes a HessianOperator, got {type(op).__name__}; build one with "
                              "prunelimit.hessian_operator(model, loss_fn, batches)")
    return op
