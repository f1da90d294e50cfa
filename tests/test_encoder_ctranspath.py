"""CTransPath (Swin-T + ConvStem) in plain torch against timm's output, and its window attention against naive loops.

The fixture (``tests/fixtures/encoders/ctranspath*.safetensors``) comes from ``scripts/encoder_fixtures_swin.py``:
a tiny CTransPath built by timm 1.0 with TransPath's ConvStem, saved in the released checkpoint's (timm 0.5.4)
naming, with timm's output on a fixed image batch. timm is never imported here.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from mmil.errors import MMILInputError
from mmil.wsi.encoders.presets import PRESETS, load_preset_weights
from mmil.wsi.encoders.swin import (
    CTRANSPATH,
    MASK_VALUE,
    SwinBlock,
    WindowAttention,
    ctranspath_checkpoint_filter,
    shifted_window_mask,
)

FIXTURES = Path(__file__).parent / "fixtures" / "encoders"


@pytest.fixture(scope="module")
def fixture():
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = FIXTURES / "ctranspath.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return config, load_file(str(path)), load_file(str(FIXTURES / "ctranspath_io.safetensors"))


def _normalised(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CTRANSPATH.mean).view(1, 3, 1, 1)
    std = torch.tensor(CTRANSPATH.std).view(1, 3, 1, 1)
    return (image.to(torch.float32) / 255.0 - mean) / std


def test_registered_preset_is_the_released_configuration():
    assert PRESETS["ctranspath"] is CTRANSPATH
    assert CTRANSPATH.input_size == 224 and CTRANSPATH.embed_dim == 768
    assert CTRANSPATH.mean == (0.485, 0.456, 0.406) and CTRANSPATH.std == (0.229, 0.224, 0.225)
    with torch.device("meta"):
        model = CTRANSPATH.build()
    # Swin-T with ConvStem and no head: 27.5 M parameters (1aurent/swin_tiny_patch4_window7_224.CTransPath model card).
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 27.5) < 0.05
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed.proj.0.weight"] == (12, 3, 3, 3) and shapes["patch_embed.proj.6.weight"] == (96, 24, 1, 1)
    assert shapes["layers.2.downsample.reduction.weight"] == (768, 1536) and not any(k.startswith("layers.3.downsample") for k in shapes)
    assert shapes["layers.3.blocks.1.attn.relative_position_bias_table"] == (169, 24) and shapes["norm.weight"] == (768,)
    assert [len(stage.blocks) for stage in model.layers] == [2, 2, 6, 2] and model.embed_dim == 768


def test_fixture_loads_strictly_and_reproduces_timm(fixture):
    config, state, io = fixture
    assert any(k.endswith("attn_mask") for k in state) and any(k.endswith("relative_position_index") for k in state)
    model = CTRANSPATH.build(**config).eval()
    loaded = load_preset_weights(model, CTRANSPATH, {"model": state}, "ctranspath.safetensors")  # nested like ctranspath.pth
    assert loaded == len(model.state_dict())
    with torch.no_grad():
        out = model(_normalised(io["image"]))
    expected = io["expected"]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.1  # the comparison is not between two near-constant vectors


def test_missing_or_unexpected_key_is_a_clear_error(fixture):
    config, state, _ = fixture
    model = CTRANSPATH.build(**config)
    broken = {k: v for k, v in state.items() if k != "layers.1.downsample.reduction.weight"}
    with pytest.raises(MMILInputError, match=r"weights\.pth: not ctranspath weights: 1 missing keys \['layers\.1\.downsample\.reduction\.weight'\]"):
        load_preset_weights(model, CTRANSPATH, broken, "weights.pth")
    extra = {**state, "absolute_pos_embed": torch.zeros(1)}
    with pytest.raises(MMILInputError, match=r"1 unexpected keys \['absolute_pos_embed'\]"):
        load_preset_weights(model, CTRANSPATH, extra, "weights.pth")


def test_filter_drops_recomputed_buffers_and_head_and_maps_the_new_timm_layout(fixture):
    _, state, _ = fixture
    before = dict(state)
    released = ctranspath_checkpoint_filter(state)
    assert state.keys() == before.keys()  # input untouched
    assert not any(re.search(r"(relative_position_index|attn_mask)$", k) for k in released)
    # timm >= 0.9 layout (e.g. a hub conversion): merging at the start of the next stage, classifier head.fc.
    new = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v for k, v in state.items()}
    new["head.fc.weight"] = torch.zeros(3, 32)
    mapped = ctranspath_checkpoint_filter(new)
    assert mapped.keys() == released.keys() and all(mapped[k] is released[k] for k in released)
    with pytest.raises(MMILInputError, match="not tensors"):
        ctranspath_checkpoint_filter({"model": {"epoch": 3}})


def _naive_window_attention(attn: WindowAttention, x: torch.Tensor, allowed) -> torch.Tensor:
    """Dense attention of one window ``(N, C)``, bias looked up by a loop over (row, col) offsets.

    ``allowed(i, j)`` says whether query ``i`` may see key ``j`` (the shifted-window rule); ``None`` = all.
    """
    n, c = x.shape
    heads, w = attn.num_heads, attn.window
    d = c // heads
    q, k, v = attn.qkv(x).split(c, dim=-1)
    table = attn.relative_position_bias_table
    out = torch.zeros(n, c, dtype=x.dtype)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(n):
            logits, values = [], []
            for j in range(n):
                if allowed is not None and not allowed(i, j):
                    continue
                dy, dx = i // w - j // w, i % w - j % w
                row = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
                logits.append(float(q[i, sl] @ k[j, sl]) / math.sqrt(d) + float(table[row, h]))
                values.append(v[j, sl])
            weights = torch.softmax(torch.tensor(logits, dtype=x.dtype), 0)
            out[i, sl] = (weights[:, None] * torch.stack(values)).sum(0)
    return attn.proj(out)


def test_window_attention_matches_dense_reference_with_looped_bias():
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, num_heads=2, window=3).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)
        x = torch.randn(1, 9, 8, dtype=torch.float64)
        got = attn(x)[0]
        ref = _naive_window_attention(attn, x[0], None)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("height,width,window,shift", [(8, 8, 4, 2), (8, 12, 4, 2), (9, 6, 3, 1)])
def test_shifted_window_mask_allows_exactly_the_unwrapped_neighbours(height, width, window, shift):
    mask = shifted_window_mask(height, width, window, shift)
    n_w = (height // window) * (width // window)
    assert mask.shape == (n_w, window * window, window * window)
    for wid in range(n_w):
        top, left = (wid // (width // window)) * window, (wid % (width // window)) * window
        for i in range(window * window):
            for j in range(window * window):
                # rolled positions (r, c) came from original ((r + shift) % H, (c + shift) % W); a pair is allowed iff
                # the roll did not separate them: original offsets equal rolled offsets along both axes.
                ri, ci = top + i // window, left + i % window
                rj, cj = top + j // window, left + j % window
                oi = ((ri + shift) % height, (ci + shift) % width)
                oj = ((rj + shift) % height, (cj + shift) % width)
                ok = (oi[0] - oj[0], oi[1] - oj[1]) == (ri - rj, ci - cj)
                assert mask[wid, i, j].item() == (0.0 if ok else MASK_VALUE), (wid, i, j)


def test_shifted_block_attention_matches_naive_reference_on_a_small_grid():
    torch.manual_seed(1)
    size, window, shift = 6, 3, 1
    block = SwinBlock(dim=4, num_heads=2, resolution=(size, size), window=window, shift=shift).double().eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
        x = torch.randn(1, size, size, 4, dtype=torch.float64)
        got = block.window_attention(x)[0]
        ref = torch.zeros_like(got)
        rolled = torch.roll(x[0], shifts=(-shift, -shift), dims=(0, 1))
        for wr in range(0, size, window):
            for wc in range(0, size, window):
                tokens = rolled[wr:wr + window, wc:wc + window].reshape(-1, 4)

                def allowed(i, j, wr=wr, wc=wc):
                    pos = [(wr + t // window, wc + t % window) for t in (i, j)]
                    orig = [((r + shift) % size, (c + shift) % size) for r, c in pos]
                    return orig[0][0] - orig[1][0] == pos[0][0] - pos[1][0] and orig[0][1] - orig[1][1] == pos[0][1] - pos[1][1]

                out = _naive_window_attention(block.attn, tokens, allowed).reshape(window, window, 4)
                for r in range(window):
                    for c in range(window):
                        ref[(wr + r + shift) % size, (wc + c + shift) % size] = out[r, c]
    # the -100 mask leaves exp(-100) ~ 4e-44 of weight on excluded keys: far below the tolerance
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
