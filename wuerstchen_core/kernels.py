"""Hand-written Triton kernels for GELU + GRN, the channel MLP's memory-bound middle (optional; see
performance.fuse_gelu_grn, off by default until a GPU run shows it faster than the compiled ops).

In fast mode the compiled GELU/GRN passes were ≈ 16% of a batch-8 image's kernel time on an H200
(docs/benchmarks-history.md, runs 11–13) and ran at a third to half of its memory bandwidth: a reduction over
the rows of a [B, N, 4c] map (the strided dimension) and an apply pass. Here every load runs along
the channels, contiguous:

- `_sum_squares`: per (image, channel block, row split) the sum of GELU(u)² over its rows in float32,
  each thread accumulating its own elements and the tile summed across threads once, after the loop.
  Row splits keep the grid wide where batch × channel blocks alone give few programs (Stage B's level 0:
  16384 rows, 1280 channels per image).
- `_scale`: one program per image adds the splits in a fixed order and forms the GRN's scale
  1 + gamma·g/(mean g + 1e-6) on [B, C] (models.common.grn_scale), rounding to the map's dtype wherever
  those eager ops return a tensor of it.
- `_apply`: GELU(u)·scale[b, c] + beta[c].

GELU(u) is rounded to u's dtype before it is squared or scaled, as the eager modules see it. The
reduction's tile is fixed, so a shape always sums in the same order (the same seed gives the same
image in every process); only the apply pass, whose tile cannot change a result, is autotuned. Runs on
a CPU only in Triton's interpreter (TRITON_INTERPRET=1; tests/test_kernels.py).
"""

import math
import os

import torch
import triton
import triton.language as tl

REDUCE_PROGRAMS = 1024  # the grid size the reduction aims for (several programs per SM)
REDUCE_ROWS, REDUCE_CHANNELS = 32, 128  # the reduction's tile (4 warps): fixed, see above
SCALE_CHANNELS = 1024
# apply tiles tried at each shape's first call; under the interpreter (nothing to time) only the first
_APPLY_TILES = [triton.Config(dict(BLOCK_R=r, BLOCK_C=c), num_warps=w)
                for r, c, w in ((32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (128, 64, 8))]
if os.environ.get("TRITON_INTERPRET") == "1":
    _APPLY_TILES = _APPLY_TILES[:1]


@triton.jit
def _gelu_rounded(u, dtype: tl.constexpr):
    x = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return x.to(dtype).to(tl.float32)


@triton.jit
def _sum_squares(u_ptr, part_ptr, N, C, ROWS_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_C: tl.constexpr):
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
    b = tl.program_id(0).to(tl.int64)
    dtype = scale_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):  # g = ‖GELU(u)‖ per channel, parked in the output
        cols = start + tl.arange(0, BLOCK_C)
        sums = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(SPLITS):
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


@triton.autotune(configs=_APPLY_TILES, key=["N", "C", "R"])
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


def row_splits(batch: int, n: int, c: int) -> tuple[int, int]:
    """(splits, rows per split) of the reduction for a [batch, n, c] map: enough programs to fill the
    card, each split a whole number of tiles."""
    programs = batch * triton.cdiv(c, REDUCE_CHANNELS)
    splits = max(1, min(triton.cdiv(n, REDUCE_ROWS), math.ceil(REDUCE_PROGRAMS / programs)))
    rows = triton.cdiv(triton.cdiv(n, splits), REDUCE_ROWS) * REDUCE_ROWS
    return triton.cdiv(n, rows), rows


@torch.library.custom_op("wuerstchen::gelu_grn", mutates_args=())
def gelu_grn(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """GRN(GELU(u)) for u [B, N, C], gamma and beta holding C values each (the GRN's parameters)."""
    u = u.contiguous()
    batch, n, c = u.shape
    splits, rows = row_splits(batch, n, c)
    partial = torch.empty(batch, splits, c, device=u.device, dtype=torch.float32)
    _sum_squares[(batch, triton.cdiv(c, REDUCE_CHANNELS), splits)](
        u, partial, n, c, ROWS_PER_SPLIT=rows, BLOCK_N=REDUCE_ROWS, BLOCK_C=REDUCE_CHANNELS, num_warps=4)
    scale = torch.empty(batch, c, device=u.device, dtype=u.dtype)
    _scale[(batch,)](partial, gamma.reshape(c).to(u.dtype).contiguous(), scale, C=c, SPLITS=splits,
                     BLOCK_C=SCALE_CHANNELS, num_warps=4)
    out = torch.empty_like(u)
    _apply[lambda tile: (triton.cdiv(batch * n, tile["BLOCK_R"]), triton.cdiv(c, tile["BLOCK_C"]))](
        u, scale, beta.reshape(c).to(u.dtype).contiguous(), out, n, c, batch * n)
    return out


@gelu_grn.register_fake
def _(u, gamma, beta):
    return torch.empty_like(u.contiguous())


def apply_tiles() -> dict:
    """The apply tile the autotuner chose per (N, C, B·N, dtypes) so far (the bench logs it)."""
    return {str(key): str(config) for key, config in _apply.cache.items()}
