"""Experiment (block_variants form `grn_triton`): GELU + GRN of a channel MLP as two hand-written Triton
kernels, behind one custom op that torch.compile keeps whole.

Fast mode's compiled GELU/GRN passes are ≈ 16% of a batch-8 image's kernel time (runs 11–13 on an H200),
and they run at a third to half of the card's memory bandwidth: a reduction over the spatial rows of a
[B, N, 4c] map (the rows are the strided dimension) and an apply pass. Both kernels here walk the map
along the channels, so every load is contiguous:

- `_sum_squares`: per (image, channel block, row split) the sum over its rows of GELU(u)², in float32,
  each thread accumulating its own elements and the tile summed across threads once at the end (a sum
  across the warps at every step costs barriers and shared memory); the row splits keep the grid wide
  where the batch and the channels alone give few programs (Stage B's level 0 has 16384 rows and 1280
  channels per image). The splits are added up afterwards in a fixed order (no atomics), so the result
  is deterministic for a given tile; the summation order, and so the last bits, depend on the tile,
  which Triton's autotuner picks per shape at its first call (pack code would pin it).
- `_scale`: one program per image forms the GRN's scale 1 + gamma·‖GELU(u)‖/(mean‖·‖ + 1e-6) on
  [B, C] (the formula of models.common.grn_scale, rounded as its ops round): one small kernel where the
  same arithmetic in torch ops took seven.
- `_apply`: GELU(u)·scale[b, c] + beta[c].

GELU(u) is rounded to u's dtype before it is squared or scaled, as the eager modules see it. Run on a
CPU only under TRITON_INTERPRET=1 (tests/test_bench.py, with triton installed).
"""

import math
import os

import torch
import triton
import triton.language as tl


SPLIT_PROGRAMS = 1024  # rough grid size the reduction aims for (several programs per SM)
SPLIT_ROWS = 64  # a row split is a multiple of this (and so of every BLOCK_N below)
# Tile sizes tried at each shape's first call (Triton's autotuner keeps the fastest; bench/gpu_bench.py logs
# the choice). Under TRITON_INTERPRET=1 (the CPU test) only the first of each is used: nothing to time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_SUM_CONFIGS = [triton.Config(dict(BLOCK_N=n, BLOCK_C=c), num_warps=w)
                for n, c, w in ((32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (64, 64, 4))]
_APPLY_CONFIGS = [triton.Config(dict(BLOCK_R=r, BLOCK_C=c), num_warps=w)
                  for r, c, w in ((32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (128, 64, 8))]


@triton.jit
def _gelu_rounded(u, dtype: tl.constexpr):
    x = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return x.to(dtype).to(tl.float32)


@triton.autotune(configs=_SUM_CONFIGS[:1] if _INTERPRETED else _SUM_CONFIGS, key=["N", "C", "ROWS_PER_SPLIT"])
@triton.jit
def _sum_squares(u_ptr, part_ptr, N, C, ROWS_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b, cb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    start = s * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, N)
    image = u_ptr + b.to(tl.int64) * N * C
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)  # summed across threads once, after the loop
    for offset in range(0, ROWS_PER_SPLIT, BLOCK_N):
        rows = start + offset + tl.arange(0, BLOCK_N)
        mask = (rows < end)[:, None] & (cols < C)[None, :]
        u = tl.load(image + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
        x = _gelu_rounded(u.to(tl.float32), u_ptr.dtype.element_ty)  # GELU(0) = 0: masked entries add nothing
        acc += x * x
    tl.store(part_ptr + (b * tl.num_programs(2) + s).to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=cols < C)


@triton.jit
def _scale(part_ptr, gamma_ptr, scale_ptr, C: tl.constexpr, SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per image: the GRN's scale 1 + gamma·g/(mean g + 1e-6) from the row splits' sums of
    squares, rounding to the map's dtype wherever the eager ops (vector_norm, mean, add, addcmul, div)
    return a tensor of it. g is parked in the output between the two passes over the channels."""
    b = tl.program_id(0).to(tl.int64)
    dtype = scale_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        sums = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(SPLITS):  # in a fixed order
            sums += tl.load(part_ptr + (b * SPLITS + s) * C + cols, mask=cols < C, other=0.0)
        g = tl.sqrt(sums).to(dtype)
        total += g.to(tl.float32)
        tl.store(scale_ptr + b * C + cols, g, mask=cols < C)
    tl.debug_barrier()  # every thread's g is written before any is read back
    mean = (tl.sum(total, axis=0) * (1.0 / C)).to(dtype).to(tl.float32)
    d = (mean + 1e-6).to(dtype).to(tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        g = tl.load(scale_ptr + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        numerator = (d + gamma * g).to(dtype).to(tl.float32)
        tl.store(scale_ptr + b * C + cols, (numerator / d).to(dtype), mask=cols < C)


@triton.autotune(configs=_APPLY_CONFIGS[:1] if _INTERPRETED else _APPLY_CONFIGS, key=["N", "C", "R"])
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
    min_channel_blocks = triton.cdiv(c, 256)  # the widest BLOCK_C: the split count must not depend on the tile
    splits = max(1, min(triton.cdiv(n, SPLIT_ROWS), math.ceil(SPLIT_PROGRAMS / (batch * min_channel_blocks))))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), SPLIT_ROWS) * SPLIT_ROWS
    splits = triton.cdiv(n, rows_per_split)
    partial = torch.empty(batch, splits, c, device=u.device, dtype=torch.float32)
    _sum_squares[lambda meta: (batch, triton.cdiv(c, meta["BLOCK_C"]), splits)](
        u, partial, n, c, ROWS_PER_SPLIT=rows_per_split)
    scale = torch.empty(batch, c, device=u.device, dtype=u.dtype)
    _scale[(batch,)](partial, gamma.reshape(c).to(u.dtype).contiguous(), scale, C=c, SPLITS=splits, BLOCK_C=1024)
    out = torch.empty_like(u)
    _apply[lambda meta: (triton.cdiv(batch * n, meta["BLOCK_R"]), triton.cdiv(c, meta["BLOCK_C"]))](
        u, scale, beta.reshape(c).to(u.dtype).contiguous(), out, n, c, batch * n)
    return out


@gelu_grn.register_fake
def _(u, gamma, beta):
    return torch.empty_like(u.contiguous())


def tuned_tiles() -> dict:
    """The tile each kernel's autotuner chose per (N, C, ...) key so far (for the bench's log)."""
    return {kernel.base_fn.__name__: {str(key): str(config) for key, config in kernel.cache.items()}
            for kernel in (_sum_squares, _apply)}
