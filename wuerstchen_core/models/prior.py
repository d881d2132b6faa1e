"""Stage C: the text-conditioned prior that denoises the 16-channel EfficientNet latent."""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .common import (AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, r_embedding, run_unit, state_shape,
                     timestep_modulations)

HEAD_DIM = 64  # head count is not stored in the weights; every Würstchen attention uses 64-d heads

# WuerstchenPrior.__init__ defaults: what diffusers uses for keys a config.json leaves out.
_DIFFUSERS_DEFAULTS = dict(c_in=16, c=1280, c_cond=1024, c_r=64, depth=16, nhead=16)


@dataclass(frozen=True)
class PriorConfig:
    c_in: int = 16  # latent channels
    c: int = 1536  # width
    c_cond: int = 1280  # text embedding width (CLIP bigG)
    c_r: int = 64  # r embedding size
    depth: int = 32  # number of (ResBlock, TimestepBlock, AttnBlock) triples
    nhead: int = 24

    def __post_init__(self):
        if self.nhead <= 0 or self.c % self.nhead:
            raise CheckpointError(f"Prior config has c={self.c} and nhead={self.nhead}; expected c divisible by nhead.")

    @classmethod
    def from_state_dict(cls, sd) -> "PriorConfig":
        """Infer the config from tensor names and shapes (nhead = c / 64)."""
        c, c_in = state_shape(sd, "projection.weight", "prior")[:2]
        c_cond = state_shape(sd, "cond_mapper.0.weight", "prior")[1]
        c_r = state_shape(sd, "blocks.1.mapper.weight", "prior")[1]
        depth = sum(k.startswith("blocks.") and k.endswith(".depthwise.weight") for k in sd)
        return cls(c_in=c_in, c=c, c_cond=c_cond, c_r=c_r, depth=depth, nhead=max(c // HEAD_DIM, 1))

    @classmethod
    def from_diffusers(cls, config: dict) -> "PriorConfig":
        """From a diffusers WuerstchenPrior config.json dict; unknown keys (dropout, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{**_DIFFUSERS_DEFAULTS, **{k: int(v) for k, v in config.items() if k in names}})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"Prior config.json has an invalid value ({e}); expected integer fields.") from None


class WuerstchenPrior(nn.Module):
    """Stage C: depth x (ResBlock, TimestepBlock, AttnBlock) at the latent resolution; predicts eps
    through (x - a) / (|1 - b| + 1e-5)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.c
        self.projection = nn.Conv2d(cfg.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            # the text is already mapped to width c, hence c_cond=c
            self.blocks.extend([ResBlock(c), TimestepBlock(c, cfg.c_r), AttnBlock(c, c, cfg.nhead)])
        self.out = nn.Sequential(LayerNorm2d(), nn.Conv2d(c, cfg.c_in * 2, kernel_size=1))
        # the (ResBlock, TimestepBlock, AttnBlock) triples as plain lists (not registered twice)
        self._res, self._films, self._attns = list(self.blocks[::3]), list(self.blocks[1::3]), list(self.blocks[2::3])

    def condition(self, clip) -> list[torch.Tensor]:
        """clip [B,T,c_cond] -> the tokens each AttnBlock attends to besides the image ([B,T,c] each).
        They depend on the text alone, so a sampler computes them once per run (forward's `cond`)."""
        silu_cond = F.silu(self.cond_mapper(clip))  # the kv_mappers' SiLU, shared by every AttnBlock
        return [attn.map_condition(silu_cond) for attn in self._attns]

    @property
    def conditioning_layers(self) -> list[nn.Module]:
        """The layers only condition() runs, once per sampling run (the text mappers): what low-VRAM mode
        streams through the device instead of holding it for every step (performance.on_device)."""
        return [self.cond_mapper, *(attn.kv_mapper[1] for attn in self._attns)]

    def forward(self, x, r, clip=None, cond=None, run_unit=run_unit):
        """x [B,c_in,h,w], r [B] in [0,1], clip [B,T,c_cond] (or cond = condition(clip)) -> eps [B,c_in,h,w].
        run_unit runs each (ResBlock, TimestepBlock, AttnBlock) triple (fast mode passes its compiled one).

        The r embedding is computed in r's own dtype and then cast to the model dtype: a float32 r
        gives the original (autocast) behaviour, r in the model's fp16 reproduces diffusers."""
        h = self.projection(x.contiguous(memory_format=torch.channels_last))  # see common.py: Layout
        cond = self.condition(clip) if cond is None else cond
        modulations = timestep_modulations(self._films, r_embedding(r, self.cfg.c_r).to(h.dtype))
        for res, film, attn, modulation, tokens in zip(self._res, self._films, self._attns, modulations, cond):
            h = run_unit((res, film, attn), h, ((), (modulation,), (tokens,)))
        a, b = self.out(h).contiguous().chunk(2, dim=1)
        return (x - a) / ((1 - b).abs() + 1e-5)
