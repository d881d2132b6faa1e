"""The three Würstchen v2 networks, with state-dict keys identical to the diffusers checkpoints."""

from .common import AttnBlock, GlobalResponseNorm, LayerNorm2d, ResBlock, ResBlockStageB, TimestepBlock, r_embedding
from .decoder import DecoderConfig, WuerstchenDecoder
from .prior import PriorConfig, WuerstchenPrior
from .vqgan import PaellaVQGAN, VQGANConfig

__all__ = [
    "AttnBlock",
    "DecoderConfig",
    "GlobalResponseNorm",
    "LayerNorm2d",
    "PaellaVQGAN",
    "PriorConfig",
    "ResBlock",
    "ResBlockStageB",
    "TimestepBlock",
    "VQGANConfig",
    "WuerstchenDecoder",
    "WuerstchenPrior",
    "r_embedding",
]
