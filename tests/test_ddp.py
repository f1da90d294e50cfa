"""Data-parallel training of one fold (issue 12): two gloo ranks take the same steps as one process
accumulating the same bags' gradients."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mmil.config import TrainConfig
from mmil.data import BagDataset
from mmil.data.synth import synthetic_bags
from mmil.ddp import rank_share
from mmil.models import create_model
from mmil.rng import private_rng, seed_global_rng
from mmil.train import train_fold

MODEL, KWARGS = "abmil", {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}  # no dropout: each rank draws its own masks


def _data() -> BagDataset:
    return BagDataset.from_bags(synthetic_bags(4, seed=5, in_dim=6, min_instances=5, max_instances=12, signal=4.0))


def _cfg(accumulate: int, pseudo_bags: int = 1) -> TrainConfig:
    # augmentation on: its seeds follow the bag's position in the global order, on every rank
    return TrainConfig(epochs=1, accumulate=accumulate, lr=1e-2, progress=False, instance_dropout=0.25, feature_noise=0.1,
                       pseudo_bags=pseudo_bags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out_dir: str, pseudo_bags: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_fold(_data(), None, MODEL, KWARGS, _cfg(accumulate=1, pseudo_bags=pseudo_bags), out_dir)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n, world", [(7, 2), (8, 2), (5, 3), (4, 1)])
def test_rank_share_covers_the_padded_order(n, world):
    order = np.random.default_rng(n).permutation(n)
    shares = [rank_share(order, r, world) for r in range(world)]
    assert len({len(b) for b, _ in shares}) == 1  # every rank takes as many steps
    positions = np.sort(np.concatenate([p for _, p in shares]))
    assert np.array_equal(positions, np.arange(len(positions))) and len(positions) == -(-n // world) * world
    for bags, pos in shares:
        assert np.array_equal(bags, order[pos % n])


@pytest.mark.parametrize("pseudo_bags", [1, 2])  # 2: each rank's bag is two backward passes, only the last all-reduces
def test_two_gloo_ranks_equal_one_process_accumulating_their_bags(tmp_path, pseudo_bags):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "ddp"), pseudo_bags), nprocs=2, join=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one optimiser step = bags 2s and 2s + 1 of the epoch's order, their losses halved
        train_fold(_data(), None, MODEL, KWARGS, _cfg(accumulate=2, pseudo_bags=pseudo_bags), tmp_path / "single")
    finally:
        torch.set_num_threads(previous)
    ddp = load_file(tmp_path / "ddp" / "checkpoint" / "model.safetensors")
    single = load_file(tmp_path / "single" / "checkpoint" / "model.safetensors")
    assert ddp.keys() == single.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    with private_rng():  # the weights the trainer starts from: the two steps moved them
        seed_global_rng(0, torch.device("cpu"))
        init = create_model(MODEL, in_dim=6, n_classes=2, **KWARGS).state_dict()
    assert max(float((ddp[k] - init[k]).abs().max()) for k in ddp) > 1e-3
    losses = [json.loads((tmp_path / d / "history.json").read_text())[0]["train_loss"] for d in ("ddp", "single")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the epoch's loss summed over both ranks' bags
