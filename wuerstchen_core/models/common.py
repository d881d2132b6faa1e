"""Building blocks shared by the Stage C prior and the Stage B decoder (ConvNeXt-style blocks,
FiLM-like timestep conditioning, self+cross attention) and the r (timestep) embedding.

Module and parameter names follow the diffusers checkpoints, so state dicts load unchanged.
Dropout slots of the reference Sequentials are kept as nn.Identity so the indices still match.

Layout: the networks keep their NCHW maps in channels_last memory, so the NHWC views that LayerNorm
and the channelwise Linears work on (x.permute(0, 2, 3, 1)) are contiguous and no block copies
its input between layouts. The blocks accept either layout; only speed depends on it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WrongComponentError

LN_EPS = 1e-6  # every LayerNorm of Stages A/B/C: non-affine, eps 1e-6


def r_embedding(r: torch.Tensor, c_r: int) -> torch.Tensor:
    """Sinusoidal embedding of r in [0, 1] (r=1 is pure noise): [B] -> [B, c_r].

    r*10000 is computed in r's dtype (an fp16 r is quantised exactly as in the reference), the
    frequencies in fp32, and the result is cast back to r's dtype. The divisor is half-1.
    """
    r = r * 10000
    half = c_r // 2
    freqs = torch.arange(half, device=r.device, dtype=torch.float32).mul(-math.log(10000) / (half - 1)).exp()
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(r.dtype)


def run_unit(blocks: tuple, h: torch.Tensor, args: tuple) -> torch.Tensor:
    """h through `blocks` in turn, blocks[i] called as blocks[i](h, *args[i]). The networks run their
    repeated units (a ResBlock with the blocks after it) through this, or through fast mode's compiled
    form of it (performance.compiled_unit), which compiles once per unit shape for all units alike."""
    for block, block_args in zip(blocks, args):
        h = block(h, *block_args)
    return h


def state_shape(sd: dict, key: str, component: str) -> tuple[int, ...]:
    """Shape of sd[key]; a missing key means the file holds something other than `component`."""
    if key not in sd:
        raise WrongComponentError(
            f"The {component} state dict has no '{key}' tensor; expected a Würstchen v2 {component} checkpoint."
        )
    return tuple(sd[key].shape)


class LayerNorm2d(nn.Module):
    """Non-affine LayerNorm over the channels of an NCHW tensor (copy-free when channels_last)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=LN_EPS).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input, in the exact reference form (eps added to the channel mean)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        scale = grn_scale(torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True), self.gamma)  # [B,1,1,C]
        # gamma * (x * n) + beta + x in one pass; in place in eager inference (see GELU)
        return torch.addcmul(self.beta, x, scale, out=x) if _may_overwrite() else torch.addcmul(self.beta, x, scale)


def grn_scale(g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """1 + gamma·g/(mean over channels of g + 1e-6) for the spatial norms g [..., C], in three small ops."""
    d = g.mean(dim=-1, keepdim=True) + 1e-6
    return torch.addcmul(d, gamma, g).div_(d)


def _may_overwrite() -> bool:
    """Whether a block may overwrite its fresh hidden tensor: not while autograd records (it may need
    the input) and not while torch.compile traces (the compiler plans memory itself)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


class GELU(nn.GELU):
    """GELU that overwrites its input in eager inference. In the channelwise MLPs its input is the
    fresh 4×-wide Linear output: the largest tensor of a block, so one copy less is the peak."""

    def forward(self, x):
        return torch.ops.aten.gelu_(x) if _may_overwrite() else super().forward(x)


class ChannelMLP(nn.Sequential):
    """Linear(c_in->4c) -> GELU -> GRN -> (dropout slot) -> Linear(4c->c), on NHWC tokens [B,H,W,c_in].

    The GELU and GRN work in place on the Linear's output at inference, or run as one kernel where
    `fused_gelu_grn` holds one for the tensor's device type (performance.fuse_gelu_grn)."""

    fused_gelu_grn: dict = {}  # device type -> fn(u [B,N,C], gamma, beta) -> GRN(GELU(u)); shared by all

    def __init__(self, c_in, c):
        h = c * 4
        super().__init__(nn.Linear(c_in, h), GELU(), GlobalResponseNorm(h), nn.Identity(), nn.Linear(h, c))

    def forward(self, x):
        fc1, gelu, grn, _, fc2 = self
        u = fc1(x)
        kernel = self.fused_gelu_grn.get(u.device.type)
        if kernel is None:
            return fc2(grn(gelu(u)))
        return fc2(kernel(u.flatten(1, -2), grn.gamma, grn.beta).view(u.shape))


class TimestepBlock(nn.Module):
    """x * (1 + a) + b with (a, b) = mapper(r embedding). The network maps the embedding for all its
    TimestepBlocks at once (timestep_modulations) and hands each block its (1 + a, b)."""

    def __init__(self, c, c_r):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x, modulation):  # modulation: (1 + a, b), each [B, c, 1, 1]
        scale, shift = modulation
        return torch.addcmul(shift, x, scale)


def timestep_modulations(blocks: list[TimestepBlock], r_embed: torch.Tensor) -> list[tuple]:
    """(1 + a, b) of each TimestepBlock in `blocks`, from one GEMM over their stacked mappers: they all
    read the same r embedding, and one Linear per block would cost two launches per block per step."""
    dtype = r_embed.dtype
    # cast before the cat: a no-op in the compute dtype, and float8 cat is not implemented on every device
    weight = torch.cat([b.mapper.weight.to(dtype) for b in blocks])
    out = F.linear(r_embed, weight, torch.cat([b.mapper.bias for b in blocks]).to(dtype))  # [B, Σ 2c]
    runs = []  # [width, count] of consecutive equally wide blocks (plain loops: torch.compile traces them)
    for b in blocks:
        if runs and runs[-1][0] == b.mapper.out_features:
            runs[-1][1] += 1
        else:
            runs.append([b.mapper.out_features, 1])
    per_run, start = [], 0
    for width, n in runs:
        ab = out[:, start:start + n * width].unflatten(1, (n, 2, width // 2))[..., None, None]  # [B,n,(a|b),c,1,1]
        ab[:, :, 0].add_(1)  # 1 + a, in place: one op per run of equally wide blocks
        per_run.append(ab)
        start += n * width
    # unbound only after every in-place add: autograd forbids modifying a base whose views unbind made
    return [m for ab in per_run for m in zip(ab[:, :, 0].unbind(1), ab[:, :, 1].unbind(1))]


class ResBlock(nn.Module):
    """Prior residual block: depthwise conv -> LN -> channelwise MLP, plus the input.

    The reference block also accepts a skip that would be concatenated before the depthwise
    conv; the prior never passes one, so it is not implemented here.
    """

    def __init__(self, c, kernel_size=3):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.channelwise = ChannelMLP(c, c)

    def forward(self, x):
        h = F.layer_norm(self.depthwise(x).permute(0, 2, 3, 1), x.shape[1:2], eps=LN_EPS)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class ResBlockStageB(nn.Module):
    """Decoder residual block: the skips (U-Net encoder map, then the level's effnet map) are
    concatenated after depthwise conv + LN, so they only enter the first Linear."""

    def __init__(self, c, c_skip=0, kernel_size=3):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.channelwise = ChannelMLP(c + c_skip, c)
        self.effnet_folded = False  # see fold_effnet

    def fold_effnet(self, mapper: nn.Conv2d) -> None:
        """Compose the first Linear's effnet columns W_eff with the level's 1×1 effnet mapper (M, m), once,
        in float32: the columns become W_eff·M and the bias b + W_eff·m, so the block takes the e-channel
        effnet features where it took the c_eff-channel mapped map (both maps are linear per pixel, so
        the arithmetic is the reference's). At c_eff = 1024, e = 16 this drops most of the Linear's input."""
        if self.effnet_folded:
            return
        linear = self.channelwise[0]
        keep = linear.in_features - mapper.out_channels
        w_eff = linear.weight[:, keep:].float()
        fused = w_eff @ mapper.weight.flatten(1).float()
        bias = torch.addmv(linear.bias.float(), w_eff, mapper.bias.float())
        weight = torch.cat([linear.weight[:, :keep], fused.to(linear.weight.dtype)], dim=1)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.in_features = weight.shape[1]
        linear.bias = nn.Parameter(bias.to(linear.bias.dtype), requires_grad=False)
        self.effnet_folded = True

    def forward(self, x, skip=None, effnet=None):
        """x, skip: [B,C,H,W] maps; effnet: the level's effnet map as NHWC [B,H,W,·] (mapped to c_eff
        channels, or the raw e-channel features once folded) or None. The maps are concatenated in that
        order along the channels and go through one Linear."""
        h = F.layer_norm(self.depthwise(x).permute(0, 2, 3, 1), x.shape[1:2], eps=LN_EPS)  # NHWC
        extra = ([skip.permute(0, 2, 3, 1)] if skip is not None else []) + ([effnet] if effnet is not None else [])
        if extra:
            h = torch.cat([h, *extra], dim=-1)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers key names)."""

    def __init__(self, c, nhead):
        super().__init__()
        self.nhead = nhead
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # index 1 was a Dropout

    def heads(self, t):  # [B,tokens,C] -> [B,heads,tokens,head_dim]
        return t.unflatten(-1, (self.nhead, -1)).transpose(1, 2)

    def forward(self, x, kv):  # x [B,N,C], kv [B,M,C]
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(kv)), self.heads(self.to_v(kv))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class AttnBlock(nn.Module):
    """Self-attention of the normalised image tokens over [image tokens || SiLU->Linear(cond)],
    no mask, residual on the un-normalised input."""

    def __init__(self, c, c_cond, nhead):
        super().__init__()
        self.attention = Attention(c, nhead)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def map_condition(self, silu_cond):
        """SiLU(cond) [B,T,c_cond] -> the [B,T,C] tokens the image attends to besides itself. The network
        applies the SiLU once for all its AttnBlocks and maps the conditioning once per sampling run."""
        return self.kv_mapper[1](silu_cond)

    def forward(self, x, cond_tokens):  # x [B,C,H,W], cond_tokens = map_condition(SiLU(cond)) [B,T,C]
        tokens = F.layer_norm(x.flatten(2).transpose(1, 2), x.shape[1:2], eps=LN_EPS)  # [B,HW,C]
        kv = torch.cat([tokens, cond_tokens], dim=1)
        return x + self.attention(tokens, kv).transpose(1, 2).reshape(x.shape)
