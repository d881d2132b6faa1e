"""Property tests for the size rules and the schedule."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wuerstchen_core.errors import SizeError
from wuerstchen_core.schedule import ALPHA_MAX, ALPHA_MIN, alphas_cumprod, r_for_alphas_cumprod
from wuerstchen_core.sizes import (MAX_SIDE, MIN_SIDE, check_stage_b_grid, image_size_for_stage_c, snap_size,
                                   stage_b_grid, stage_c_grid)

sides = st.integers(min_value=-100, max_value=MAX_SIDE + 63)  # everything that snaps to <= MAX_SIDE


@pytest.mark.parametrize("side, hc, hb, out", [
    (512, 12, 128, 512), (768, 18, 192, 768), (1000, 24, 256, 1024), (1024, 24, 256, 1024),
    (1152, 27, 288, 1152), (1280, 30, 320, 1280), (1536, 36, 384, 1536), (2048, 48, 512, 2048),
])
def test_reference_size_table(side, hc, hb, out):
    assert stage_c_grid(side, side) == (hc, hc)
    assert stage_b_grid(hc, hc) == (hb, hb)
    assert image_size_for_stage_c(hc, hc) == (out, out)


def test_snap_examples_and_errors():
    assert snap_size(1024, 1536) == (1024, 1536, None)
    w, h, warning = snap_size(1000, 1100)
    assert (w, h) == (1024, 1152) and "1000×1100" in warning
    assert snap_size(1088, 1087)[:2] == (1152, 1024)  # ties round up
    assert snap_size(64, 300)[:2] == (MIN_SIDE, 256)
    with pytest.raises(SizeError, match=str(MAX_SIDE)):
        snap_size(MAX_SIDE + 64, 1024)
    with pytest.raises(SizeError, match="divisible by 16"):
        check_stage_b_grid(*stage_b_grid(*stage_c_grid(1100, 1024)))


@settings(max_examples=200, deadline=None)
@given(sides, sides)
def test_snapped_sizes_are_valid(width, height):
    w, h, warning = snap_size(width, height)
    for requested, side in ((width, w), (height, h)):
        assert side % 128 == 0 and MIN_SIDE <= side <= MAX_SIDE
        # nearest multiple of 128 unless raised to the minimum
        assert side == MIN_SIDE or abs(side - requested) <= 64
    assert (warning is None) == ((w, h) == (width, height))
    hb, wb = stage_b_grid(*stage_c_grid(h, w))
    check_stage_b_grid(hb, wb)
    assert image_size_for_stage_c(*stage_c_grid(h, w)) == (h, w)  # multiples of 128 round-trip exactly


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000))
def test_grids_are_monotone(a, b):
    lo, hi = sorted((a, b))
    c_lo, c_hi = stage_c_grid(lo, lo)[0], stage_c_grid(hi, hi)[0]
    assert c_lo <= c_hi and stage_b_grid(c_lo, c_lo)[0] <= stage_b_grid(c_hi, c_hi)[0]
    assert c_lo >= lo / 42.67  # the grid always covers the image


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_alphas_cumprod_monotone_and_clamped(r1, r2):
    a1, a2 = alphas_cumprod(torch.tensor([min(r1, r2), max(r1, r2)], dtype=torch.float32)).tolist()
    assert a1 >= a2
    lo, hi = (torch.tensor(v, dtype=torch.float32).item() for v in (ALPHA_MIN, ALPHA_MAX))  # float32 clamps
    assert lo <= a2 and a1 <= hi


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 0.99))
def test_r_alpha_round_trip(r):
    a = alphas_cumprod(torch.tensor([r], dtype=torch.float64))
    assert ALPHA_MIN < a.item() < ALPHA_MAX
    assert math.isclose(r_for_alphas_cumprod(a).item(), r, abs_tol=1e-6)
