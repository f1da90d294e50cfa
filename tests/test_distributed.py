"""Two gloo CPU processes on shards of the data reproduce the single-process statistics exactly."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prunelimit.distributed import all_reduce_sum, is_distributed, shard, world
from prunelimit.epsilon import loss_epsilon
from prunelimit.estimators import hessian_rows_null_mass, hutchinson_trace, slq
from prunelimit.hessian import HessianOperator

LOSS = nn.CrossEntropyLoss()
WORLD = 2




def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(100, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (100,))
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 100, 16)]  # 7 batches, last one of 4
    v = torch.randn(sum(p.numel() for p in (model[0].weight, model[2].weight)), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    return model, data, v


def _statistics(model, data, v):
    op = HessianOperator(model, LOSS, data)
    spectrum = slq(op, num_steps=30, num_probes=2, seed=3)
    return {
        "hv": (op @ v).numpy(),
        "grad": op.gradient().numpy(),
        "loss": np.array(op.loss()),
        "trace": hutchinson_trace(op, 4, seed=2).samples,
        "eps": np.array(loss_epsilon(model, LOSS, data)),
        "nodes": spectrum.nodes,
        "weights": spectrum.weights,
        "p0_norms": hessian_rows_null_mass(op, quantiles=[0.1, 0.5, 0.9]).row_l1_norms,
    }


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert is_distributed() and world() == (rank, WORLD)
        model, data, v = _problem()
        stats = _statistics(model, shard(data), v)
        np.savez(f"{out_dir}/rank{rank}.npz", **stats)
    finally:
        dist.destroy_process_group()


def test_sharded_statistics_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    model, data, v = _problem()
    single = _statistics(model, data, v)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(WORLD)]
    for key, ref in single.items():
        for r in range(WORLD):
            np.testing.assert_allclose(ranks[r][key], ref, rtol=1e-10, atol=1e-12, err_msg=key)
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=f"{key} differs across ranks")
    assert not is_distributed() and world() == (0, 1)


def test_shard_deals_batches_round_robin():
    data = list(range(7))
    assert list(shard(data, 0, 2)) == [0, 2, 4, 6] and list(shard(data, 1, 2)) == [1, 3, 5]
    assert len(shard(data, 1, 2)) == 3 and len(shard(data, 0, 3)) == 3 and len(shard(data, 2, 3)) == 2
    assert sorted(x for r in range(3) for x in shard(data, r, 3)) == data
    t = torch.ones(3)
    assert all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))  # no-op without a process group
    with pytest.raises(ValueError):
        shard(data, 2, 2)
