"""A tiny EfficientNet encoder with every block kind of EfficientNetV2-S, and an EfficientNet randomiser."""

import torch
from torch import nn

from wuerstchen_core.models.effnet import EffNetConfig, EfficientNetEncoder, Stage

# Same stage kinds and strides as V2-S (total stride 32). Covered: fused without expansion (residual),
# fused with expansion (and, with 2 layers, its residual), MBConv with expansion, MBConv residual.
TINY_EFFNET = EffNetConfig(
    stages=(
        Stage(True, 1, 3, 1, 8, 8, 1),
        Stage(True, 2, 3, 2, 8, 16, 2),
        Stage(True, 2, 3, 2, 16, 16, 1),
        Stage(False, 2, 3, 2, 16, 24, 1),
        Stage(False, 2, 3, 1, 24, 24, 1),
        Stage(False, 2, 3, 2, 24, 32, 1),
    ),
    c_stem=8,
    c_head=64,
    c_latent=4,
)


@torch.no_grad()
def randomize_effnet_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random Conv2d / BatchNorm2d values for ours or torchvision's modules; returns it in eval().

    Unlike tiny_models.randomize_ (N(0, 1/fan_in) weights, BN gains around 0), this keeps the signal alive
    through V2-S's 40 blocks: He-scaled convs and BN gains in [0.5, 1.5], so the output still depends on
    the input and a wrong block (a missing residual, say) changes it by O(1), not 1e-6. Running stats are
    random too (var in [0.5, 2]) so eval-mode BatchNorm is exercised."""
    g = torch.Generator().manual_seed(seed)

    def uniform_(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            if m.bias is not None:
                uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            uniform_(m.weight, 0.5, 1.5)
            uniform_(m.bias, -0.2, 0.2)
            uniform_(m.running_mean, -0.2, 0.2)
            uniform_(m.running_var, 0.5, 2.0)
    return module.eval()


def tiny_encoder(seed: int = 0) -> EfficientNetEncoder:
    return randomize_effnet_(EfficientNetEncoder(TINY_EFFNET), seed)
