"""MobileNetV2 (Sandler et al. 2018), cut into the modules that muNet paths are made of.

torchvision's wheels do not load against our CPU torch, so the architecture is written here. Two
forms of the same network:

- `MobileNetV2`: torchvision's layout and key names (`features.N...`, `classifier.1`), so its
  ImageNet checkpoint (or a torchvision-format fine-tune) loads with `load_state_dict` unchanged.
  It is the reference forward pass that the cut modules are checked against.
- the path modules, cut at the natural joints:

    conv_stem:          (B, 3, H, W) float in [0, 1] -> (B, 32, H/2, W/2)  ImageNet normalisation + conv
    inverted_residual:  (B, C, h, w) -> (B, C', h/s, w/s)                  expand 1x1, depthwise 3x3, project 1x1
    conv_1x1:           (B, 320, h, w) -> (B, 1280, h, w)                  the last pointwise conv
    conv_adapter:       (B, C, h, w) -> (B, C, h, w)                       residual adapter (muNet's layer insertion)
    pool_head:          (B, C, h, w) -> (B, classes)                       global average pool + linear

Convolutions do not care about the image size, so a module serves any resolution; the task fixes
one (its root's input size) for training and serving alike.

BatchNorm: every module keeps its BatchNorm layers in inference mode, also while training (see
`train`). A task trains on batches of 32-64 images from one small data set; batch statistics that
small and that narrow would drift the pretrained running statistics away from what every other
layer was trained with, and a cloned block would stop being its original at step 0. The affine
parameters (and all convolutions) still train. Newly inserted blocks instead start from running
statistics measured on the task's own images (evolution/train.py `_calibrate`), then freeze them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's mobilenet_v2 settings: expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                             [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


# ---- the reference network, in torchvision's layout ------------------------------------------


class ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation with BatchNorm and ReLU6: keys `0.weight`, `1.weight`, ..."""

    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=False),
        )


class _TVInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel=1))
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0), same key names; input ImageNet-normalised RGB."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        inp, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU(3, inp, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(_TVInvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(ConvBNReLU(inp, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


# ---- the path modules ----------------------------------------------------------------------------


class FrozenBNMixin:
    """BatchNorm stays in inference mode whatever `train()` says (module docstring: why)."""

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)  # type: ignore[misc]
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


@dataclass(frozen=True)
class StemConfig:
    in_chans: int = 3
    out: int = 32
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):  # JSON gives lists back; keep tuples so configs compare and hash alike
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class InvertedResidualConfig:
    inp: int = 32
    oup: int = 16
    stride: int = 1
    hidden: int = 32
    expand: bool = False  # False: no 1x1 expansion (t = 1), the depthwise conv runs on the input


@dataclass(frozen=True)
class PointwiseConfig:
    inp: int = 320
    oup: int = 1280


@dataclass(frozen=True)
class ConvAdapterConfig:
    channels: int = 32
    hidden: int = 32


@dataclass(frozen=True)
class PoolHeadConfig:
    dim: int = 1280
    num_classes: int = 10


class ConvStem(FrozenBNMixin, nn.Module):
    kind = "conv_stem"

    def __init__(self, cfg: StemConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv2d(cfg.in_chans, cfg.out, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(cfg.out)
        # part of the config, not the weights: clients and ONNX send [0, 1] pixels
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.cfg.out

    def example_input(self, batch: int = 2, size: int = 64) -> torch.Tensor:
        return torch.rand(batch, self.cfg.in_chans, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return F.relu6(self.bn(self.conv(x)))


class InvertedResidual(FrozenBNMixin, nn.Module):
    kind = "inverted_residual"

    def __init__(self, cfg: InvertedResidualConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg
        if c.expand:
            self.expand_conv = nn.Conv2d(c.inp, c.hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(c.hidden)
        elif c.hidden != c.inp:
            raise ValueError("a block without expansion has hidden == inp")
        self.dw_conv = nn.Conv2d(c.hidden, c.hidden, 3, c.stride, 1, groups=c.hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(c.hidden)
        self.project = nn.Conv2d(c.hidden, c.oup, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(c.oup)

    @property
    def residual(self) -> bool:
        return self.cfg.stride == 1 and self.cfg.inp == self.cfg.oup

    @property
    def out_dim(self) -> int:
        return self.cfg.oup

    def example_input(self, batch: int = 2, size: int = 8) -> torch.Tensor:
        return torch.randn(batch, self.cfg.inp, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.expand_bn(self.expand_conv(x))) if self.cfg.expand else x
        h = F.relu6(self.dw_bn(self.dw_conv(h)))
        h = self.project_bn(self.project(h))
        return x + h if self.residual else h

    @classmethod
    def identity(cls, channels: int, expand_ratio: int = 6) -> InvertedResidual:
        """A new stride-1 block that adds nothing until trained (muNet's layer insertion)."""
        block = cls(InvertedResidualConfig(channels, channels, 1, channels * expand_ratio, True))
        _kaiming(block)
        return block.identity_init()

    @torch.no_grad()
    def identity_init(self) -> InvertedResidual:
        if not self.residual:
            raise ValueError("only a residual block (stride 1, same channels) can start as the identity")
        # the last BatchNorm's scale and shift at zero: the residual branch outputs exactly 0 whatever
        # its input and statistics, as in zero-gamma ResNet initialisation
        nn.init.zeros_(self.project_bn.weight)
        nn.init.zeros_(self.project_bn.bias)
        return self

    @torch.no_grad()
    def widen(self, extra: int, rng: np.random.Generator) -> InvertedResidual:
        """Function-preserving expansion of the hidden channels (Gesmundo & Maile 2023, MLP expansion).

        New expansion filters and depthwise filters are random; the projection's new input columns are
        zero, so the new channels contribute nothing until trained.
        """
        c = self.cfg
        if not c.expand:
            raise ValueError("a block without a 1x1 expansion has no hidden channels to widen")
        wide = InvertedResidual(InvertedResidualConfig(c.inp, c.oup, c.stride, c.hidden + extra, True))
        g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        sd = {k: v.clone() for k, v in self.state_dict().items()}
        new = wide.state_dict()
        for k, v in new.items():
            old = sd.get(k)
            if old is None or old.shape == v.shape:
                new[k] = old if old is not None else v
                continue
            grown = v.clone()
            if k.endswith("num_batches_tracked"):
                grown = old
            elif k == "project.weight":  # (oup, hidden, 1, 1): new input columns zero
                grown.zero_()
                grown[:, : c.hidden] = old
            else:  # expand conv rows, depthwise filters, BN vectors of the hidden channels
                if k.endswith(("conv.weight",)):
                    fan_in = v[0].numel()
                    grown = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
                elif k.endswith("running_var") or k.endswith("bn.weight"):
                    grown = torch.ones(v.shape)
                else:
                    grown = torch.zeros(v.shape)
                grown[: c.hidden] = old
            new[k] = grown
        wide.load_state_dict(new)
        return wide


class Pointwise(FrozenBNMixin, nn.Module):
    """The last 1x1 conv of MobileNetV2 (320 -> 1280 channels), BN and ReLU6."""

    kind = "conv_1x1"

    def __init__(self, cfg: PointwiseConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv2d(cfg.inp, cfg.oup, 1, bias=False)
        self.bn = nn.BatchNorm2d(cfg.oup)

    @property
    def out_dim(self) -> int:
        return self.cfg.oup

    def example_input(self, batch: int = 2, size: int = 4) -> torch.Tensor:
        return torch.randn(batch, self.cfg.inp, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)))


class ConvAdapter(nn.Module):
    """A residual 1x1-conv bottleneck; the zero up-projection makes it the identity at insertion."""

    kind = "conv_adapter"

    def __init__(self, cfg: ConvAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Conv2d(cfg.channels, cfg.hidden, 1)
        self.up = nn.Conv2d(cfg.hidden, cfg.channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def out_dim(self) -> int:
        return self.cfg.channels

    def example_input(self, batch: int = 2, size: int = 4) -> torch.Tensor:
        return torch.randn(batch, self.cfg.channels, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu6(self.down(x)))


class PoolHead(nn.Module):
    kind = "pool_head"

    def __init__(self, cfg: PoolHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.dim, cfg.num_classes)

    def example_input(self, batch: int = 2, size: int = 3) -> torch.Tensor:
        return torch.randn(batch, self.cfg.dim, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))  # (B, C) logits; ReduceMean in ONNX, any spatial size

    @staticmethod
    def reduce(features: torch.Tensor) -> torch.Tensor:
        """The smallest input that gives the same logits: the spatial mean, (N, C, 1, 1)."""
        return features.mean((2, 3), keepdim=True)

    @classmethod
    def fresh(cls, dim: int, num_classes: int, like: PoolHead | None = None) -> PoolHead:
        head = cls(PoolHeadConfig(dim, num_classes))
        nn.init.zeros_(head.fc.weight)  # zero logits: uniform predictions until trained
        nn.init.zeros_(head.fc.bias)
        return head


MODULE_KINDS: dict[str, tuple[type[nn.Module], type]] = {
    "conv_stem": (ConvStem, StemConfig),
    "inverted_residual": (InvertedResidual, InvertedResidualConfig),
    "conv_1x1": (Pointwise, PointwiseConfig),
    "conv_adapter": (ConvAdapter, ConvAdapterConfig),
    "pool_head": (PoolHead, PoolHeadConfig),
}


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---- cutting the reference network into path modules --------------------------------------------


def _copy(dst: nn.Module, src_sd: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Load `dst` from `src_sd`, where names maps dst prefix -> src prefix."""
    sd = {}
    for k in dst.state_dict():
        for d, s in names.items():
            if k.startswith(d + "."):
                sd[k] = src_sd[s + k[len(d):]]
                break
        else:
            raise KeyError(f"no source for {k}")
    dst.load_state_dict(sd, strict=True)


def cut_mobilenet_v2(net: MobileNetV2) -> list[nn.Module]:
    """The path modules of a torchvision-layout MobileNetV2, weights copied, in eval mode."""
    sd = net.state_dict()
    mods: list[nn.Module] = []
    stem = ConvStem(StemConfig(3, net.features[0][0].out_channels))
    _copy(stem, sd, {"conv": "features.0.0", "bn": "features.0.1"})
    mods.append(stem)
    for i in range(1, len(net.features) - 1):
        tv = net.features[i]
        dw = [m for m in tv.conv.modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
        proj = [m for m in tv.conv if isinstance(m, nn.Conv2d)][0]
        expand = len(tv.conv) == 4
        inp = tv.conv[0][0].in_channels
        cfg = InvertedResidualConfig(inp, proj.out_channels, dw.stride[0], dw.in_channels, expand)
        block = InvertedResidual(cfg)
        p = f"features.{i}.conv"
        names = ({"expand_conv": f"{p}.0.0", "expand_bn": f"{p}.0.1", "dw_conv": f"{p}.1.0", "dw_bn": f"{p}.1.1",
                  "project": f"{p}.2", "project_bn": f"{p}.3"} if expand else
                 {"dw_conv": f"{p}.0.0", "dw_bn": f"{p}.0.1", "project": f"{p}.1", "project_bn": f"{p}.2"})
        _copy(block, sd, names)
        mods.append(block)
    last = net.features[-1]
    pw = Pointwise(PointwiseConfig(last[0].in_channels, last[0].out_channels))
    _copy(pw, sd, {"conv": f"features.{len(net.features) - 1}.0", "bn": f"features.{len(net.features) - 1}.1"})
    mods.append(pw)
    lin = net.classifier[1]
    head = PoolHead(PoolHeadConfig(lin.in_features, lin.out_features))
    _copy(head, sd, {"fc": "classifier.1"})
    mods.append(head)
    return [m.eval() for m in mods]


def mobilenet_v2_from_state_dict(state: dict[str, torch.Tensor]) -> MobileNetV2:
    """A torchvision-format state dict (any number of classes) as the reference network."""
    if "classifier.1.weight" not in state:
        raise ValueError("not a torchvision MobileNetV2 state dict: no 'classifier.1.weight'")
    net = MobileNetV2(num_classes=int(state["classifier.1.weight"].shape[0]))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"not a torchvision MobileNetV2 (width 1.0) state dict: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return net.eval()
