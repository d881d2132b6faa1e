"""Stage B ("DiffNeXt"): a U-Net that denoises the 4-channel VQGAN latent, conditioned on the
Stage C EfficientNet map (resized + 1x1-mapped into the ResBlocks) and on CLIP-H text."""

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, WrongComponentError
from .common import (LN_EPS, AttnBlock, LayerNorm2d, ResBlockStageB, TimestepBlock, r_embedding, run_unit, state_shape,
                     timestep_modulations)

HEAD_DIM = 64  # head counts are not stored in the weights; every Würstchen attention uses 64-d heads
PATCH_SIZE = 2  # not recoverable from the weights either (only c_in * patch**2 is); all checkpoints use 2

_BLOCK_KEY = re.compile(r"down_blocks\.(\d+)\.(\d+)\.(depthwise\.weight|mapper\.weight|attention\.to_q\.weight)$")
_BLOCK_KIND = {"depthwise.weight": "C", "mapper.weight": "T", "attention.to_q.weight": "A"}
_LIST_FIELDS = {"c_hidden": int, "nhead": int, "blocks": int, "level_config": str, "inject_effnet": bool}


@dataclass(frozen=True)
class DecoderConfig:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024  # width of the mapped text tokens and effnet maps
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)  # -1: level without attention
    blocks: tuple[int, ...] = (4, 4, 14, 4)  # repetitions of level_config[i], down and up
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")  # C=ResBlockStageB, T=Timestep, A=Attn
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3

    def __post_init__(self):
        n = len(self.c_hidden)
        if not all(len(t) == n for t in (self.nhead, self.blocks, self.level_config, self.inject_effnet)):
            raise CheckpointError(f"Decoder config has per-level lists of unequal lengths; expected {n} entries each.")
        for c, heads, level in zip(self.c_hidden, self.nhead, self.level_config):
            if not re.fullmatch("C[CTA]*", level):
                raise CheckpointError(f"Decoder config has level_config '{level}'; expected C/T/A letters, C first.")
            if "A" in level and (heads <= 0 or c % heads):
                raise CheckpointError(f"Decoder config has c_hidden={c} with nhead={heads}; expected a divisor of c.")

    @classmethod
    def from_state_dict(cls, sd) -> "DecoderConfig":
        """Infer the config from tensor names and shapes.

        Two values cannot be read from the weights and follow the Würstchen convention:
        patch_size = 2, and nhead = c_hidden / 64 at levels with attention (-1 elsewhere).
        """
        c_cond, clip_embd = state_shape(sd, "clip_mapper.weight", "decoder")
        c_in = state_shape(sd, "embedding.1.weight", "decoder")[1] // PATCH_SIZE**2
        c_out = state_shape(sd, "clf.1.weight", "decoder")[0] // (2 * PATCH_SIZE**2)
        levels: dict[int, dict[int, str]] = {}  # level -> {index in down_blocks[level]: block kind}
        for key in sd:
            if m := _BLOCK_KEY.match(key):
                levels.setdefault(int(m[1]), {})[int(m[2])] = _BLOCK_KIND[m[3]]
        if not levels or sorted(levels) != list(range(len(levels))):
            raise WrongComponentError(
                "The decoder state dict has no consecutive down_blocks levels; "
                "expected a Würstchen v2 decoder checkpoint."
            )
        c_hidden, nhead, blocks, level_config = [], [], [], []
        for i in range(len(levels)):
            kinds = "".join(levels[i][j] for j in sorted(levels[i]))
            period = next(p for p in range(1, len(kinds) + 1) if kinds == kinds[:p] * (len(kinds) // p))
            first = min(levels[i])  # the first block (index 1 after a downsampler)
            c, _, _, kernel_size = state_shape(sd, f"down_blocks.{i}.{first}.depthwise.weight", "decoder")
            c_hidden.append(c)
            nhead.append(c // HEAD_DIM if "A" in kinds else -1)
            blocks.append(len(kinds) // period)
            level_config.append(kinds[:period])
        c_r = next((v.shape[1] for k, v in sd.items() if k.endswith(".mapper.weight")), cls.c_r)  # TimestepBlocks
        n = len(levels)
        inject = tuple(f"effnet_mappers.{i}.weight" in sd for i in range(n))
        effnet_embd = next((sd[f"effnet_mappers.{i}.weight"].shape[1] for i in range(n) if inject[i]),
                           cls.effnet_embd)
        return cls(c_in=c_in, c_out=c_out, c_r=c_r, patch_size=PATCH_SIZE, c_cond=c_cond, c_hidden=tuple(c_hidden),
                   nhead=tuple(nhead), blocks=tuple(blocks), level_config=tuple(level_config), inject_effnet=inject,
                   effnet_embd=effnet_embd, clip_embd=clip_embd, kernel_size=kernel_size)

    @classmethod
    def from_diffusers(cls, config: dict) -> "DecoderConfig":
        """From a diffusers WuerstchenDiffNeXt config.json dict; unknown keys (dropout, ...) are ignored
        and missing keys take the diffusers defaults (= the public checkpoint)."""
        kw = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        try:
            for name, cast in _LIST_FIELDS.items():
                if name in kw:
                    kw[name] = tuple(cast(v) for v in kw[name])
            return cls(**{k: v if k in _LIST_FIELDS else int(v) for k, v in kw.items()})
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"Decoder config.json has an invalid value ({e}); expected integers and per-level lists."
            ) from None


class WuerstchenDecoder(nn.Module):
    """Stage B U-Net; predicts eps through (x - a) / (sigmoid(b) * 0.998 + 0.001)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        ch, p = cfg.c_hidden, cfg.patch_size
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        # one 1x1 mapper per down level (0..n-1), then per up level, deepest first (n..2n-1)
        inject = cfg.inject_effnet + cfg.inject_effnet[::-1]
        self.effnet_mappers = nn.ModuleList([nn.Conv2d(cfg.effnet_embd, cfg.c_cond, 1) if i else None for i in inject])
        self.embedding = nn.Sequential(nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p**2, ch[0], 1), LayerNorm2d())

        def level(i, c_skip_first):
            c_effnet = cfg.c_cond if cfg.inject_effnet[i] else 0
            out, first = [], True
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    if kind == "C":
                        out.append(ResBlockStageB(ch[i], (c_skip_first if first else 0) + c_effnet, cfg.kernel_size))
                        first = False
                    elif kind == "T":
                        out.append(TimestepBlock(ch[i], cfg.c_r))
                    else:
                        out.append(AttnBlock(ch[i], cfg.c_cond, cfg.nhead[i]))
            return out

        n = len(ch)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            down = [nn.Sequential(LayerNorm2d(), nn.Conv2d(ch[i - 1], ch[i], 2, stride=2))] if i else []
            self.down_blocks.append(nn.ModuleList(down + level(i, 0)))
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            # the first ResBlock of every level but the deepest also takes the encoder output
            up = level(i, ch[i] if i < n - 1 else 0)
            if i:
                up.append(nn.Sequential(LayerNorm2d(), nn.ConvTranspose2d(ch[i], ch[i - 1], 2, stride=2)))
            self.up_blocks.append(nn.ModuleList(up))
        self.clf = nn.Sequential(LayerNorm2d(), nn.Conv2d(ch[0], 2 * cfg.c_out * p**2, 1), nn.PixelShuffle(p))
        # in the order the forward visits them; a plain list (not registered twice)
        self._timestep_blocks = [m for m in self.modules() if isinstance(m, TimestepBlock)]

    def condition(self, effnet, clip, grid) -> list:
        """What the forward derives from the conditioning alone, for a Stage B latent grid (H, W): per
        AttnBlock the [B,T,c_cond] text tokens it attends to, per effnet-injected ResBlock the effnet map
        resized to its level (NHWC, in the model dtype): through the level's mapper, or not once the block
        is folded (fold_effnet). One entry per such block in the order the forward visits them. A sampler
        computes it once per run (forward's `cond`); effnet may be float32 (it is resized in float32)."""
        dtype = self.embedding[1].weight.dtype  # a conv: never fp8-stored
        silu_clip = F.silu(F.layer_norm(self.clip_mapper(clip), (self.cfg.c_cond,), eps=LN_EPS))
        n, resized, out = len(self.down_blocks), {}, []
        for index, level in enumerate([*self.down_blocks, *self.up_blocks]):
            depth = index if index < n else 2 * n - 1 - index
            size = ((grid[0] // self.cfg.patch_size) >> depth, (grid[1] // self.cfg.patch_size) >> depth)
            mapper, mapped = self.effnet_mappers[index], None
            if mapper is not None and size not in resized:  # once per size, shared by down and up levels
                resized[size] = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True,
                                              align_corners=True).to(dtype).permute(0, 2, 3, 1).contiguous()
            for block in level:
                if isinstance(block, AttnBlock):
                    out.append(block.map_condition(silu_clip))
                elif isinstance(block, ResBlockStageB) and mapper is not None:
                    if not block.effnet_folded and mapped is None:  # the 1×1 mapper as a Linear on NHWC
                        mapped = F.linear(resized[size], mapper.weight.flatten(1), mapper.bias)
                    out.append(resized[size] if block.effnet_folded else mapped)
        return out

    @property
    def conditioning_layers(self) -> list[nn.Module]:
        """The layers only condition() runs, once per sampling run (the text mappers): what low-VRAM mode
        streams through the device instead of holding it for every step (performance.on_device)."""
        return [self.clip_mapper, *(m.kv_mapper[1] for m in self.modules() if isinstance(m, AttnBlock))]

    def fold_effnet(self) -> "WuerstchenDecoder":
        """Inference form (in place, once): every effnet-injected ResBlock composes its effnet columns with
        the level's mapper (ResBlockStageB.fold_effnet): the public decoder's weights shrink by 0.38 GiB in
        fp16 (210 M of its 1055 M parameters). The state dict then no longer has the checkpoint layout, so
        this is for sampling, not for saving or comparing weights."""
        for index, level in enumerate([*self.down_blocks, *self.up_blocks]):
            if (mapper := self.effnet_mappers[index]) is not None:
                for block in level:
                    if isinstance(block, ResBlockStageB):
                        block.fold_effnet(mapper)
        return self

    def forward(self, x, r, effnet=None, clip=None, cond=None, run_unit=run_unit):
        """x [B,c_in,H,W], r [B] in [0,1], effnet [B,effnet_embd,h,w], clip [B,T,clip_embd] (or cond =
        condition(effnet, clip, x's grid)) -> eps like x. r is embedded in its own dtype (see
        WuerstchenPrior.forward) and the embedding cast to the model dtype. run_unit runs each ResBlock with
        the TimestepBlock/AttnBlocks after it, and each down- or up-sampler (fast mode passes its compiled one)."""
        dtype = self.embedding[1].weight.dtype
        # per-block inputs, consumed in visit order
        modulations = iter(timestep_modulations(self._timestep_blocks, r_embedding(r, self.cfg.c_r).to(dtype)))
        per_block = iter(self.condition(effnet, clip, x.shape[-2:]) if cond is None else cond)

        def run(blocks, h, encoder_skip, injected):  # the encoder map feeds only the level's first ResBlock
            units = []  # ([blocks], [their extra arguments]): a ResBlock or sampler and the blocks after it
            for block in blocks:
                if isinstance(block, TimestepBlock):
                    args = (next(modulations),)
                elif isinstance(block, AttnBlock):
                    args = (next(per_block),)
                elif isinstance(block, ResBlockStageB):
                    args, encoder_skip = (encoder_skip, next(per_block) if injected else None), None
                else:  # a down- or up-sampler
                    args = ()
                if isinstance(block, (TimestepBlock, AttnBlock)) and units:
                    units[-1][0].append(block)
                    units[-1][1].append(args)
                else:
                    units.append(([block], [args]))
            for unit_blocks, unit_args in units:
                h = run_unit(tuple(unit_blocks), h, tuple(unit_args))
            return h

        n = len(self.down_blocks)
        h, encoder_outs = self.embedding(x.contiguous(memory_format=torch.channels_last)), []
        for i, level in enumerate(self.down_blocks):
            h = run(level, h, None, self.effnet_mappers[i] is not None)  # levels after the first: down-sampler first
            encoder_outs.insert(0, h)  # deepest first
        for u, level in enumerate(self.up_blocks):
            h = run(level, h, encoder_outs[u] if u else None, self.effnet_mappers[n + u] is not None)
        a, b = self.clf(h).contiguous().chunk(2, dim=1)
        return (x - a) / (b.sigmoid() * (1 - 2e-3) + 1e-3)
