"""Tiny configs and random-weight models of the pack's networks, shared by the test suite.

Stable interface (other test files import it):
    tiny_prior_config(**overrides) -> PriorConfig          tiny_prior(seed=0, **overrides) -> WuerstchenPrior
    tiny_decoder_config(**overrides) -> DecoderConfig      tiny_decoder(seed=0, **overrides) -> WuerstchenDecoder
    tiny_vqgan_config(**overrides) -> VQGANConfig          tiny_vqgan(seed=0, **overrides) -> PaellaVQGAN
    randomize_(module, seed) -> module

The configs follow the conventions that from_state_dict relies on (nhead = width / 64, patch 2),
so from_state_dict(tiny_model.state_dict()) == tiny config. Models are fp32, CPU, eval mode.
"""

import dataclasses
import math

import torch
from torch import nn

from wuerstchen_core.models import (
    DecoderConfig,
    PaellaVQGAN,
    PriorConfig,
    VQGANConfig,
    WuerstchenDecoder,
    WuerstchenPrior,
)


def tiny_prior_config(**overrides) -> PriorConfig:
    """Toy prior: width 128 = 2 heads of 64, 2 triples, odd c_r (exercises the zero pad)."""
    return dataclasses.replace(PriorConfig(c_in=4, c=128, c_cond=48, c_r=17, depth=2, nhead=2), **overrides)


def tiny_decoder_config(**overrides) -> DecoderConfig:
    """4-level toy decoder shaped like the public one: attention at levels 1-3 (1 or 2 heads),
    effnet injected at levels 1-3, several blocks per level, U-Net skips. Latent sides must be
    multiples of 16."""
    cfg = DecoderConfig(
        c_in=4, c_out=4, c_r=16, patch_size=2, c_cond=64, c_hidden=(32, 64, 128, 128), nhead=(-1, 1, 2, 2),
        blocks=(2, 2, 3, 1), level_config=("CT", "CTA", "CTA", "CTA"), inject_effnet=(False, True, True, True),
        effnet_embd=8, clip_embd=48, kernel_size=3,
    )
    return dataclasses.replace(cfg, **overrides)


def tiny_vqgan_config(**overrides) -> VQGANConfig:
    """2-level f4 toy VQGAN (widths 16, 32) with 2 bottleneck blocks."""
    cfg = VQGANConfig(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64)
    return dataclasses.replace(cfg, **overrides)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and buffer of a CPU module with seeded random values, so that
    zero-initialised tensors (GRN gamma/beta, Paella gammas, timestep mappers) cannot hide bugs.

    Weights get N(0, 1/fan_in) so activations stay O(1) through deep stacks; vectors (biases,
    GRN/Paella gains) get N(0, 0.5^2); BatchNorm running_var is in [0.5, 1.5]. Values depend only
    on the seed and the state-dict names/shapes, in sorted name order.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in sorted(module.state_dict(keep_vars=True).items()):
        if not t.is_floating_point():
            t.copy_(torch.randint(0, 100, t.shape, generator=gen))
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith(".weight") and t.dim() >= 2:  # Linear / conv / codebook: fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel()))
        else:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    return module


def _build(cls, cfg, seed):
    return randomize_(cls(cfg), seed).eval()


def tiny_prior(seed=0, **overrides) -> WuerstchenPrior:
    return _build(WuerstchenPrior, tiny_prior_config(**overrides), seed)


def tiny_decoder(seed=0, **overrides) -> WuerstchenDecoder:
    return _build(WuerstchenDecoder, tiny_decoder_config(**overrides), seed)


def tiny_vqgan(seed=0, **overrides) -> PaellaVQGAN:
    return _build(PaellaVQGAN, tiny_vqgan_config(**overrides), seed)
