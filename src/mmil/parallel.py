"""Folds and bench models in several processes (``--workers K``, issue 12).

Each fold seeds itself from the training seed alone (:mod:`mmil.train`) and resumes from its
own files, so running folds in other processes, in any order, gives the metrics of the
sequential run (with the same number of torch threads per fold: the summation order of a
multi-threaded matmul is not the single-threaded one).

* On one machine (:func:`run_tasks`): ``K`` worker processes started with ``spawn`` (no
  forked torch state), the CPU threads split between them (``max(1, threads // K)`` each),
  tasks handed out in order; each worker prints one line per finished epoch and per finished
  task, tagged ``[worker i]`` (progress bars from several processes would garble each other).
* Under ``torchrun`` (:func:`run_folds`): with ``K > 1`` rank ``r`` runs tasks ``r, r + G, ...``
  and rank 0 then collects every task's saved result; with ``K = 1`` every rank takes part
  in every fold, data-parallel (:mod:`mmil.ddp`), and rank 0 evaluates and writes.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import torch

from . import ddp

_worker_id: int | None = None


def split_threads(threads: int, workers: int) -> int:
    """Torch threads per worker: ``max(1, threads // workers)``."""
    return max(1, int(threads) // max(1, int(workers)))


def _init_worker(ids, threads: int) -> None:
    global _worker_id
    _worker_id = ids.get()
    torch.set_num_threads(threads)


def _epoch_line(prefix: str) -> Callable[[dict[str, Any]], None]:
    def line(record: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} {record[k]:.4f}" for k in ("train_loss", "val_loss", "val_auc")
                          if isinstance(record.get(k), float) and record[k] == record[k])
        print(f"{prefix}: epoch {record['epoch']} ({record.get('seconds', 0.0):.1f} s) {shown}", file=sys.stderr, flush=True)

    return line


def _call(fn: Callable[..., Any], args: tuple, label: str) -> Any:
    """In a worker: ``fn(*args, callback=...)``, announcing every epoch and the end."""
    prefix = f"[worker {_worker_id}] {label}"
    t0 = time.perf_counter()
    result = fn(*args, callback=_epoch_line(prefix))
    print(f"{prefix}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return result


def run_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], workers: int, labels: Sequence[str] | None = None) -> list[Any]:
    """``[fn(*t) for t in tasks]``, in ``workers`` spawned processes when ``workers > 1``.

    ``fn`` must be a module-level function (pickled by name) taking a ``callback`` keyword
    (called with each epoch's record); the tasks' arguments and results are pickled. Results
    come back in task order; the first failure is raised (as raised in the worker) once the
    tasks already running have ended.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    labels = list(labels) if labels is not None else [f"task {i}" for i in range(len(tasks))]
    k = min(int(workers), len(tasks))
    ctx = mp.get_context("spawn")
    ids = ctx.Queue()
    for i in range(k):
        ids.put(i)
    threads = split_threads(torch.get_num_threads(), k)
    print(f"mmil: {len(tasks)} tasks in {k} worker processes, {threads} torch thread(s) each", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(k, mp_context=ctx, initializer=_init_worker, initargs=(ids, threads)) as pool:
        futures = [pool.submit(_call, fn, tuple(t), label) for t, label in zip(tasks, labels)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_folds(fn: Callable[..., Any], tasks: Sequence[tuple], workers: int, labels: Sequence[str] | None = None,
              pending: Sequence[bool] | None = None) -> list[Any] | None:
    """The fold tasks' results (see the module doc); ``None`` on the ranks that do not write.

    ``pending`` says which tasks still have work (the others only read their saved result): no
    worker processes are started for fewer than two. Under torchrun with ``workers > 1`` each rank
    runs its share of the tasks, waits for the others, and rank 0 runs every task again, which
    loads the results the ranks saved.
    """
    if not ddp.active():
        busy = len(tasks) if pending is None else sum(bool(p) for p in pending)
        return run_tasks(fn, tasks, workers if busy > 1 else 1, labels)
    rank, world = ddp.rank_world()
    if workers == 1:  # data-parallel: every rank takes part in every fold
        results = [fn(*t) for t in tasks]
        return results if rank == 0 else None
    for t in list(tasks)[rank::world]:
        fn(*t)
    ddp.barrier()
    return [fn(*t) for t in tasks] if rank == 0 else None
