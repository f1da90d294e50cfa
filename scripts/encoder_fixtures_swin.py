"""Conformance fixture for the ``ctranspath`` preset, made with timm as the independent reference.

Run once, in a separate environment that has timm (never in the test suite)::

    python -m venv /work/timm-env && /work/timm-env/bin/pip install torch timm   # CPU torch; timm 1.0.x
    /work/timm-env/bin/python scripts/encoder_fixtures_swin.py [--out tests/fixtures/encoders]

It builds CTransPath the way the authors do (TransPath ``ctran.py``:
``timm.create_model('swin_tiny_patch4_window7_224', embed_layer=ConvStem)``, head removed) at a tiny
width/depth, gives every parameter and BatchNorm statistic a random value, and writes

* ``ctranspath.safetensors``: the state dict in the *released* checkpoint's naming (``ctranspath.pth``'s
  ``model`` entry, timm 0.5.4), metadata ``config`` = the tiny architecture as JSON;
* ``ctranspath_io.safetensors``: ``image`` (a fixed uint8 batch, ``(B, 3, H, W)``) and ``expected`` (timm's
  pooled output for ``(image / 255 - mean) / std`` with ImageNet's mean/std, ``8 * 2**(stages-1)`` wide).

timm 1.0 names the Swin weights differently from the timm 0.5.4 of the release, so the state dict is
converted back here (the inverse of timm's own ``swin_transformer.checkpoint_filter_fn``):

* patch merging: timm 1.0 runs it at the *start* of stage ``N+1`` (``layers.{N+1}.downsample``); 0.5.4 at
  the *end* of stage ``N`` (``layers.N.downsample``) -- same ``norm``/``reduction`` tensors, index minus one;
* buffers: 0.5.4 saved ``layers.N.blocks.M.attn.relative_position_index`` (every block) and
  ``layers.N.blocks.M.attn_mask`` (shifted blocks only) in the state dict; timm 1.0 keeps them
  non-persistent. They are added back from the model's own buffers, so the fixture carries them exactly as
  the released file does and our checkpoint filter must drop them;
* the classifier: the released file has no ``head.*`` (the authors load it with ``head = nn.Identity()``);
  the model here is built with ``num_classes=0``, so there is none either.

The ConvStem below reproduces the structure of TransPath's (github.com/Xiyue-Wang/TransPath ``ctran.py``):
``proj = [conv3x3/2 (no bias), BN, ReLU, conv3x3/2 (no bias), BN, ReLU, conv1x1]`` with widths
``embed_dim/8, embed_dim/4, embed_dim``, then ``norm``; written here to take timm 1.0's extra arguments
(``strict_img_size``, ``output_fmt='NHWC'``). It is test tooling, not package code.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path

# timm 1.0.31 imports torchvision, whose meta registrations fail beside this CPU torch; an empty stub avoids it.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

TINY = {"img_size": 64, "embed_dim": 8, "depths": [2, 2, 2], "num_heads": [1, 2, 4], "window_size": 4}
BATCH = 2
SEED = 1234
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvStem(nn.Module):
    """TransPath's convolutional stem (stride 4 in two stride-2 3x3 convolutions), NHWC output for timm 1.0."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=True, output_fmt="NHWC", **_):
        super().__init__()
        assert patch_size == 4 and embed_dim % 8 == 0 and output_fmt == "NHWC"
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        assert tuple(x.shape[-2:]) == self.img_size, f"input {tuple(x.shape[-2:])} != {self.img_size}"
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` with ImageNet's mean/std (TransPath's transform)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image.to(torch.float32) / 255.0 - mean) / std


def build_reference() -> nn.Module:
    """Tiny CTransPath in timm 1.0 (the reference), every tensor randomised, in eval mode."""
    import timm  # noqa: PLC0415

    torch.manual_seed(SEED)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem, num_classes=0,
        drop_path_rate=0.0, **{**TINY, "depths": tuple(TINY["depths"]), "num_heads": tuple(TINY["num_heads"])},
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)  # large enough that a wrong index or missing bias shows
            elif p.dim() == 1 and ("norm" in name or ".proj.1." in name or ".proj.4." in name):
                p.copy_((1.0 + 0.3 * torch.randn_like(p)) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.6 / p[0].numel() ** 0.5)  # ~unit-scale activations: std 0.6 / sqrt(fan_in)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model.eval()


def to_released_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm 1.0 Swin state dict -> the timm 0.5.4 naming of the released ``ctranspath.pth`` (see module doc)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        assert not key.startswith("head"), key
        out[key] = value.detach().clone().contiguous()
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index") or name.endswith("attn_mask"):
            assert name not in out, name  # non-persistent in timm 1.0
            out[name] = buf.detach().clone().contiguous()
    return out


def make_ctranspath_fixture(out_dir: Path) -> None:
    """Write ``ctranspath.safetensors`` and ``ctranspath_io.safetensors`` into ``out_dir``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    model = build_reference()
    gen = torch.Generator().manual_seed(SEED + 1)
    img = TINY["img_size"]
    image = torch.randint(0, 256, (BATCH, 3, img, img), generator=gen, dtype=torch.uint8)
    x = normalise(image)
    with torch.no_grad():
        expected = model(x)
    state = to_released_names(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(TINY), "reference": "timm " + __import__("timm").__version__ + ", torch " + torch.__version__}
    save_file(state, str(out_dir / "ctranspath.safetensors"), metadata=meta)
    save_file({"image": image.contiguous(), "expected": expected.contiguous()}, str(out_dir / "ctranspath_io.safetensors"), metadata=meta)
    n_params = sum(v.numel() for k, v in state.items())
    print(f"ctranspath: {len(state)} tensors ({n_params} values), output {tuple(expected.shape)} -> {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "encoders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    make_ctranspath_fixture(args.out)


if __name__ == "__main__":
    main()
