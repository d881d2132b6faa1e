"""Experiment (block_variants form `grn_triton`): GELU + GRN of a channel MLP as two hand-written Triton
kernels, behind one custom op that torch.compile keeps whole.

Fast mode's compiled GELU/GRN passes are ≈ 16% of a batch-8 image's kernel time (runs 11–13 on an H200),
and they run at a third to half of the card's memory bandwidth: a reduction over the spatial rows of a
[B, N, 4c] map (the rows are the strided dimension) and an apply pass. Both kernels here walk the map
along the channels, so every load is contiguous:

- `_sum_squares`: per (image, channel block, row split) the sum over its rows of GELU(u)², in float32; the
  row splits keep the grid wide where the batch and the channels alone give few programs (Stage B's
  level 0 has 16384 rows and 1280 channels per image). The splits are added up afterwards in a fixed
  order, so the result is deterministic (no atomics).
- `_apply`: GELU(u)·scale[b, c] + beta[c], with scale = 1 + gamma·‖GELU(u)‖/(mean‖·‖ + 1e-6) formed
  between the two in the GRN's own ops on [B, C].

GELU(u) is rounded to u's dtype before it is squared or scaled, as the eager modules see it. Run on a
CPU only under TRITON_INTERPRET=1 (tests/test_bench.py, with triton installed).
"""

import math

import torch
import triton
import triton.language as tl

from wuerstchen_core.models.common import grn_scale

SPLIT_PROGRAMS = 1024  # rough grid size the reduction aims for (several programs per SM)


@triton.jit
def _gelu_rounded(u, dtype: tl.constexpr):
    x = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return x.to(dtype).to(tl.float32)


@triton.jit
def _sum_squares(u_ptr, part_ptr, N, C, ROWS_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b, cb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    start = s * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, N)
    image = u_ptr + b.to(tl.int64) * N * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for offset in range(0, ROWS_PER_SPLIT, BLOCK_N):
        rows = start + offset + tl.arange(0, BLOCK_N)
        mask = (rows < end)[:, None] & (cols < C)[None, :]
        u = tl.load(image + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
        x = _gelu_rounded(u.to(tl.float32), u_ptr.dtype.element_ty)  # GELU(0) = 0: masked entries add nothing
        acc += tl.sum(x * x, axis=0)
    tl.store(part_ptr + (b * tl.num_programs(2) + s).to(tl.int64) * C + cols, acc, mask=cols < C)


@triton.jit
def _apply(u_ptr, scale_ptr, beta_ptr, out_ptr, N, C, R, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # over B·N
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = _gelu_rounded(tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32), u_ptr.dtype.element_ty)
    scale = tl.load(scale_ptr + (rows // N)[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
    out = x * scale.to(tl.float32) + beta.to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("wuerstchen_bench::gelu_grn", mutates_args=())
def gelu_grn(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """GRN(GELU(u)) for u [B, N, C] (contiguous), gamma and beta holding C values."""
    u = u.contiguous()
    batch, n, c = u.shape
    block_n, block_c = 32, 128
    channel_blocks = triton.cdiv(c, block_c)
    splits = max(1, min(triton.cdiv(n, block_n), math.ceil(SPLIT_PROGRAMS / (batch * channel_blocks))))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, rows_per_split)
    partial = torch.empty(batch, splits, c, device=u.device, dtype=torch.float32)
    _sum_squares[(batch, channel_blocks, splits)](u, partial, n, c, ROWS_PER_SPLIT=rows_per_split, BLOCK_N=block_n,
                                                  BLOCK_C=block_c)
    g = partial.sum(dim=1).sqrt().to(u.dtype)  # [B, C]: the spatial L2 norm, as vector_norm rounds it
    scale = grn_scale(g, gamma.reshape(1, c).to(u.dtype)).contiguous()
    out = torch.empty_like(u)
    block_r = 32
    _apply[(triton.cdiv(batch * n, block_r), channel_blocks)](
        u, scale, beta.reshape(c).to(u.dtype).contiguous(), out, n, c, batch * n, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


@gelu_grn.register_fake
def _(u, gamma, beta):
    return torch.empty_like(u.contiguous())
