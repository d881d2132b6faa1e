"""EfficientNetV2-S + 1x1 mapper: the image encoder whose output defines the Stage C latent.

Pure PyTorch re-implementation of torchvision's `efficientnet_v2_s().features` (inference only: stochastic
depth is the identity at eval and is left out) with the same state-dict keys, so the original
`effnet_state_dict` of `model_v2_stage_b.pt` loads unchanged.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, SizeError, StageMismatchError
from ..sizes import stage_c_grid
from .common import state_shape

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Stage(NamedTuple):
    fused: bool  # FusedMBConv (k×k expand conv) or MBConv (1×1 expand, k×k depthwise, squeeze-excite)
    expand: int  # hidden width = c_in * expand
    kernel: int
    stride: int  # of the first layer; the others have stride 1 and c_in == c_out
    c_in: int
    c_out: int
    layers: int


V2_S_STAGES = (
    Stage(True, 1, 3, 1, 24, 24, 2),
    Stage(True, 4, 3, 2, 24, 48, 4),
    Stage(True, 4, 3, 2, 48, 64, 4),
    Stage(False, 4, 3, 2, 64, 128, 6),
    Stage(False, 6, 3, 1, 128, 160, 9),
    Stage(False, 6, 3, 2, 160, 256, 15),
)

# Strides live in no tensor, so they come from torchvision's layouts, keyed by the number of stages:
# 6 = EfficientNetV2-S (Würstchen v2), 7 = EfficientNetV2-M/L (the v1 encoder used V2-L).
_STRIDES = {6: (1, 2, 2, 2, 1, 2), 7: (1, 2, 2, 2, 1, 2, 1)}

_WHAT = "EfficientNet encoder"


@dataclass(frozen=True)
class EffNetConfig:
    stages: tuple[Stage, ...] = V2_S_STAGES
    c_stem: int = 24  # 3×3 stride-2 stem conv width
    c_head: int = 1280  # final 1×1 conv width
    c_latent: int = 16  # mapper output = Stage C latent channels
    bn_eps: float = 1e-3  # backbone BatchNorms (the mapper's BatchNorm keeps PyTorch's default 1e-5)

    @classmethod
    def public(cls) -> "EffNetConfig":
        """EfficientNetV2-S with a 16-channel mapper, as in model_v2_stage_b.pt."""
        return cls()

    @classmethod
    def from_state_dict(cls, sd) -> "EffNetConfig":
        """Infer the stage table from the `backbone.<i>.<j>.block.<m>...` names and shapes."""
        c_stem = state_shape(sd, "backbone.0.0.weight", _WHAT)[0]
        n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("backbone.") and k.split(".")[1].isdigit())
        if n - 2 not in _STRIDES:
            raise CheckpointError(
                f"The {_WHAT} state dict has {max(n - 2, 0)} backbone stages; expected 6 (EfficientNetV2-S) or 7."
            )
        stages = tuple(_infer_stage(sd, i, stride) for i, stride in zip(range(1, n - 1), _STRIDES[n - 2]))
        c_head, c_last = state_shape(sd, f"backbone.{n - 1}.0.weight", _WHAT)[:2]
        widths = [c_stem] + [s.c_out for s in stages]
        if [s.c_in for s in stages] + [c_last] != widths:
            raise CheckpointError(
                f"The {_WHAT} state dict has backbone widths stem {c_stem}, stages "
                f"{[(s.c_in, s.c_out) for s in stages]}, head input {c_last}; "
                "expected each stage to take the previous one's output."
            )
        c_latent = state_shape(sd, "mapper.0.weight", _WHAT)[0]
        return cls(stages=stages, c_stem=c_stem, c_head=c_head, c_latent=c_latent)


def _infer_stage(sd, i: int, stride: int) -> Stage:
    p = f"backbone.{i}.0.block"  # the first layer holds the stage's c_in, expansion and kernel
    layers = len({k.split(".")[2] for k in sd if k.startswith(f"backbone.{i}.")})
    if f"{p}.1.fc1.weight" in sd or f"{p}.2.fc1.weight" in sd:  # MBConv: squeeze-excite after the depthwise
        has_expand = f"{p}.2.fc1.weight" in sd
        c_mid, _, k, _ = state_shape(sd, f"{p}.{int(has_expand)}.0.weight", _WHAT)  # depthwise [c_mid,1,k,k]
        c_in = state_shape(sd, f"{p}.0.0.weight", _WHAT)[1] if has_expand else c_mid
        c_out = state_shape(sd, f"{p}.{2 + has_expand}.0.weight", _WHAT)[0]
        return _stage(i, False, c_in, c_mid, c_out, k, stride, layers)
    # FusedMBConv: k×k conv, then a 1×1 projection only when it expands
    c_first, c_in, k, _ = state_shape(sd, f"{p}.0.0.weight", _WHAT)
    if f"{p}.1.0.weight" in sd:
        return _stage(i, True, c_in, c_first, state_shape(sd, f"{p}.1.0.weight", _WHAT)[0], k, stride, layers)
    return _stage(i, True, c_in, c_in, c_first, k, stride, layers)


def _stage(i, fused, c_in, c_mid, c_out, k, stride, layers) -> Stage:
    if c_mid % c_in:
        raise CheckpointError(f"The {_WHAT} state dict has backbone stage {i} widening {c_in} to {c_mid} channels; "
                              "expected an integer expansion ratio.")
    return Stage(fused, c_mid // c_in, k, stride, c_in, c_out, layers)


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm [-> SiLU]; indices .0/.1 as in torchvision's Conv2dNormActivation."""

    def __init__(self, c_in, c_out, kernel, stride=1, groups=1, act=True, eps=1e-3):
        conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(c_out, eps=eps), *([nn.SiLU()] if act else []))


class SqueezeExcite(nn.Module):
    def __init__(self, c, c_squeeze):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)

    def forward(self, x):
        return x * self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class MBConv(nn.Module):
    """Inverted residual block, fused (k×k expand conv) or not (1×1 expand, k×k depthwise, SE), linear projection."""

    def __init__(self, fused, c_in, c_out, expand, kernel, stride, eps):
        super().__init__()
        c_mid = c_in * expand
        if fused and expand == 1:
            layers = [ConvBN(c_in, c_out, kernel, stride, eps=eps)]
        elif fused:
            layers = [ConvBN(c_in, c_mid, kernel, stride, eps=eps), ConvBN(c_mid, c_out, 1, act=False, eps=eps)]
        else:
            layers = [ConvBN(c_in, c_mid, 1, eps=eps)] if expand != 1 else []
            layers += [
                ConvBN(c_mid, c_mid, kernel, stride, groups=c_mid, eps=eps),
                SqueezeExcite(c_mid, max(1, c_in // 4)),  # squeeze width from the block input, as torchvision
                ConvBN(c_mid, c_out, 1, act=False, eps=eps),
            ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNetEncoder(nn.Module):
    def __init__(self, cfg: EffNetConfig = EffNetConfig()):
        super().__init__()
        self.cfg = cfg
        eps = cfg.bn_eps
        stages = [
            nn.Sequential(*(
                MBConv(s.fused, s.c_out if j else s.c_in, s.c_out, s.expand, s.kernel, 1 if j else s.stride, eps)
                for j in range(s.layers)
            ))
            for s in cfg.stages
        ]
        self.backbone = nn.Sequential(
            ConvBN(3, cfg.c_stem, 3, 2, eps=eps), *stages, ConvBN(cfg.stages[-1].c_out, cfg.c_head, 1, eps=eps)
        )
        self.mapper = nn.Sequential(nn.Conv2d(cfg.c_head, cfg.c_latent, 1, bias=False), nn.BatchNorm2d(cfg.c_latent))

    def forward(self, x):
        """x [B,3,h,w] ImageNet-normalised -> raw mapper BatchNorm features [B,c_latent,ceil(h/32),ceil(w/32)]."""
        return self.mapper(self.backbone(x))


def preprocess_for_effnet(images, out_h: int, out_w: int):
    """images [B,3,H,W] in 0..1 -> [B,3,out_h,out_w]: resize (bilinear, antialiased) until the image covers
    the target, centre-crop, ImageNet-normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise StageMismatchError(
            f"The {_WHAT} got an image tensor of shape {tuple(images.shape)}; expected [batch, 3, height, width]."
        )
    h, w = images.shape[-2:]
    scale = max(out_h / h, out_w / w)
    size = (max(out_h, round(h * scale)), max(out_w, round(w * scale)))
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - out_h) // 2, (size[1] - out_w) // 2
    images = images[:, :, top : top + out_h, left : left + out_w]
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def effnet_input_size(width: int, height: int) -> tuple[int, int]:
    """(h, w) the encoder must see so that its output grid is the Stage C grid for a width×height image.

    The prior's grid is ceil(side / 42.67) and 42.67 ≈ 32 / 0.75: the encoder sees the image at 0.75× and
    its stride 32 yields the grid. Each stride-2 conv (k3, pad 1) maps n -> ceil(n / 2), so the output is
    ceil(n / 32); we feed exactly 32 × grid so every latent cell is backed by real pixels, not padding.
    That is exactly 0.75 × side for sides that are multiples of 128 (the sizes the pipeline generates) and
    about 0.75 × side rounded up to a multiple of 32 otherwise.
    """
    if width <= 0 or height <= 0:
        raise SizeError(f"The {_WHAT} was asked for a {width}x{height} latent; expected a positive image size.")
    hc, wc = stage_c_grid(height, width)
    return 32 * hc, 32 * wc


@torch.no_grad()
def encode_stage_c(encoder: EfficientNetEncoder, images, width: int, height: int):
    """images [B,3,H,W] in 0..1 -> float32 Stage C latent [B,c_latent,ceil(height/42.67),ceil(width/42.67)]
    in the prior's space, (effnet + 1) / 42. Stage B wants the raw features back: latent * 42 - 1."""
    p = next(encoder.parameters())
    x = preprocess_for_effnet(images.to(p.device, torch.float32), *effnet_input_size(width, height))
    return (encoder(x.to(p.dtype)).float() + 1) / 42
