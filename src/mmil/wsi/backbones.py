"""Patch encoders: our own ResNet-50 (torchvision's parameter names) and timm models by name.

``resnet50-trunc`` is ResNet-50 cut after ``layer3`` with global average pooling, a
1024-d feature: the CLAM convention used for the paper's CAMELYON16 features. The
module tree mirrors ``torchvision.models.resnet50`` (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``; bottlenecks with ``conv1..3``, ``bn1..3`` and
``downsample.0/1``; stride on the 3x3 convolution, "ResNet v1.5"), so the weight
files users already have load directly: torchvision's ``resnet50-*.pth``, CLAM's
(which are torchvision's) and timm's ``resnet50.tv_in1k`` (same names). For the
truncated model ``layer4.*`` and ``fc.*`` are dropped on load; any other missing or
unexpected key is an error, never silently ignored.

Weights only ever come from a local file (``torch.load(weights_only=True)`` or
safetensors); nothing is downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import MMILInputError
from .transforms import IMAGENET_MEAN, IMAGENET_STD

RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_TRUNC_DIM = 1024

_WEIGHTS_HINT = (
    "download the ImageNet ResNet-50 weights once on a machine with internet, e.g. "
    "https://download.pytorch.org/models/resnet50-19c8e357.pth (torchvision / CLAM) and pass the file with --weights; "
    "for tests or smoke runs pass --random-weights instead"
)


class Bottleneck(nn.Module):
    """ResNet bottleneck ``1x1 -> 3x3 (stride) -> 1x1`` with identity or projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with bottlenecks, optionally truncated after ``num_stages`` stages.

    ``num_stages=4`` with ``num_classes`` is torchvision's classifier; ``num_stages=3``
    without a head gives the pooled ``layer3`` feature (1024-d for ResNet-50).
    """

    def __init__(self, blocks=RESNET50_BLOCKS, num_stages: int = 4, num_classes: int | None = 1000):
        super().__init__()
        if not 1 <= num_stages <= len(blocks):
            raise ValueError(f"num_stages must be in 1..{len(blocks)}, got {num_stages}")
        self.num_stages = num_stages
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i in range(num_stages):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(inplanes, planes) for _ in range(1, blocks[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_dim = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so --random-weights behaves like an untrained torchvision model.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled feature of the last kept stage, ``(B, out_dim)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.forward_features(x)
        return feats if self.fc is None else self.fc(feats)


def resnet50(num_classes: int = 1000) -> ResNet:
    """Full ResNet-50 with torchvision's names (320 state-dict entries)."""
    return ResNet(RESNET50_BLOCKS, num_stages=4, num_classes=num_classes)


def resnet50_trunc() -> ResNet:
    """ResNet-50 up to ``layer3`` + global average pooling: ``(B, 3, H, W) -> (B, 1024)``."""
    return ResNet(RESNET50_BLOCKS, num_stages=3, num_classes=None)


def read_weight_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` or torch file, loaded without executing code.

    Torch files go through ``torch.load(weights_only=True)``; a dict holding the
    weights under ``state_dict`` or ``model`` is unwrapped, and a DataParallel
    ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: weights file not found; {_WEIGHTS_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise MMILInputError(f"{path}: cannot read safetensors weights ({err}); the file is corrupt, download it again") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for code objects, RuntimeError for corrupt zips
            raise MMILInputError(
                f"{path}: cannot load as plain tensors with torch.load(weights_only=True) ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "save the weights as a state dict (torch.save(model.state_dict(), path)) or as .safetensors"
            ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MMILInputError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def filter_torchvision_resnet(state: dict[str, Tensor], num_stages: int) -> tuple[dict[str, Tensor], list[str]]:
    """Drop the stages after ``num_stages`` and the classifier from a torchvision ResNet state dict.

    Returns ``(kept, dropped_keys)``; the input is not modified.
    """
    drop_prefixes = tuple(f"layer{i}." for i in range(num_stages + 1, 5)) + ("fc.",)
    kept = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    dropped = sorted(k for k in state if k.startswith(drop_prefixes))
    return kept, dropped


@dataclass
class LoadReport:
    """What happened to the keys of a weight file."""

    loaded: int
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def check_state_keys(expected: Iterable[str], mapped: Mapping[str, Tensor], source: str, what: str, hint: str) -> None:
    """Raise an :class:`MMILInputError` naming ``source`` and a few keys if ``mapped`` lacks or adds any key."""
    expected = set(expected)
    missing = sorted(expected - set(mapped))
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected:
        raise MMILInputError(
            f"{source}: not {what} weights: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}; {hint}"
        )


def load_resnet_weights(model: ResNet, state: dict[str, Tensor], source: str = "weights") -> LoadReport:
    """Load torchvision-named weights into ``model``; raise on missing/unexpected keys or shapes."""
    kept, dropped = filter_torchvision_resnet(state, model.num_stages)
    if model.fc is not None:
        kept.update({k: v for k, v in state.items() if k.startswith("fc.")})
        dropped = [k for k in dropped if not k.startswith("fc.")]
    check_state_keys(model.state_dict(), kept, source, "torchvision ResNet-50", _WEIGHTS_HINT)
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as err:
        raise MMILInputError(f"{source}: weight shapes do not fit ResNet-50 ({str(err).splitlines()[-1].strip()}); {_WEIGHTS_HINT}") from None
    return LoadReport(loaded=len(kept), dropped=dropped)


@dataclass
class Backbone:
    """A patch encoder ready for inference.

    ``input_size`` is the side patches are resized to (``None`` keeps the patch size).
    """

    name: str
    model: nn.Module
    out_dim: int
    input_size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    report: LoadReport | None = None
    weights: str | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
    input_size: int | None = -1,
) -> Backbone:
    """Build a patch encoder in eval mode.

    ``name``: ``resnet50-trunc`` or ``timm:MODEL``. Exactly one of ``weights`` (a
    local file) and ``random_weights=True`` (seeded by ``seed``; for tests) is needed.
    ``input_size``: ``-1`` = the backbone's default (224 for ``resnet50-trunc``, CLAM's
    ``target_patch_size``; timm's pretrained config), ``None`` or ``0`` = keep patch size.
    A preset name (``uni``, ``virchow2``, ...: :mod:`mmil.wsi.encoders.presets`) builds our own implementation.
    """
    from .encoders.presets import PRESETS  # noqa: PLC0415 - encoder presets (uni, virchow2, ...; encoders/presets.py)

    if name in PRESETS:
        from .encoders.build import preset_backbone  # noqa: PLC0415

        return preset_backbone(name, weights, random_weights=random_weights, seed=seed, input_size=input_size)
    if weights is None and not random_weights:
        raise MMILInputError(f"backbone {name!r} needs weights: {_WEIGHTS_HINT}")
    if weights is not None and random_weights:
        raise MMILInputError("pass either --weights FILE or --random-weights, not both")
    if name == "resnet50-trunc":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet50_trunc()
        report = None
        if weights is not None:
            report = load_resnet_weights(model, read_weight_file(weights), str(weights))
        size = 224 if input_size == -1 else (input_size or None)
        return Backbone(name, model.eval(), model.out_dim, size, report=report, weights=None if weights is None else str(weights))
    if name.startswith("timm:"):
        return _build_timm(name, name[len("timm:") :], weights, seed, input_size)
    raise MMILInputError(f"unknown backbone {name!r}; choose 'resnet50-trunc', a preset ({', '.join(PRESETS)}) or 'timm:MODEL_NAME' (e.g. timm:vit_base_patch16_224)")


def _build_timm(full_name: str, model_name: str, weights, seed: int, input_size: int | None) -> Backbone:
    try:
        import timm  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise MMILInputError(f"backbone {full_name!r} needs timm, which is not installed; `pip install 'mmil-prunelimit[timm]'` or use resnet50-trunc") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception as err:  # timm raises RuntimeError for unknown names
        raise MMILInputError(f"timm cannot build {model_name!r} ({err}); list names with `python -c 'import timm; print(timm.list_models())'`") from None
    report = None
    if weights is not None:
        state = read_weight_file(weights)
        classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier", "head"))
        result = model.load_state_dict(state, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.startswith(classifier + ".")]
        if result.missing_keys or unexpected:
            raise MMILInputError(
                f"{weights}: weights do not fit timm model {model_name!r}: missing {list(result.missing_keys)[:4]}, unexpected {unexpected[:4]}"
            )
        report = LoadReport(loaded=len(state) - len(result.unexpected_keys), dropped=sorted(set(result.unexpected_keys) - set(unexpected)))
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    default_size = int(cfg["input_size"][-1]) if "input_size" in cfg else 224
    size = default_size if input_size == -1 else (input_size or None)
    return Backbone(full_name, model.eval(), int(model.num_features), size, mean, std, report, None if weights is None else str(weights))
