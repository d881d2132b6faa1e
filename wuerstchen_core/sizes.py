"""Image size rules: Stage C grid = ceil(side / 42.67), Stage B grid = int(grid_c · 10.67), image = 4 · grid_b.

Stage B's U-Net needs a grid divisible by 16, which holds exactly when the Stage C grid is a multiple
of 3, i.e. when the image side is a multiple of 128 px (true for every side below 12,800 px).
"""

import math

from .errors import SizeError

RESOLUTION_MULTIPLE = 42.67  # image px per Stage C cell (prior pipeline config)
LATENT_DIM_SCALE = 10.67  # Stage B cells per Stage C cell (decoder pipeline config; not 32/3)
SIZE_STEP = 128
# Trained at 1024–1536 px; 2048 works sometimes. Above 4096 px Stage B attention over
# (side/16)² tokens gets impractically slow, so larger sizes are refused rather than attempted.
MAX_SIDE = 4096
MIN_SIDE = 256


def stage_c_grid(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / RESOLUTION_MULTIPLE), math.ceil(width / RESOLUTION_MULTIPLE)


def stage_b_grid(hc: int, wc: int) -> tuple[int, int]:
    return int(hc * LATENT_DIM_SCALE), int(wc * LATENT_DIM_SCALE)


def image_size_for_stage_c(hc: int, wc: int) -> tuple[int, int]:
    """(height, width) in px that a Stage C grid decodes to."""
    hb, wb = stage_b_grid(hc, wc)
    return 4 * hb, 4 * wb


def check_stage_b_grid(hb: int, wb: int) -> None:
    """Raise SizeError unless a Stage B latent grid fits the decoder's U-Net (both sides divisible by 16)."""
    if hb % 16 or wb % 16:
        raise SizeError(
            f"Stage B latent grid {hb}×{wb} is not divisible by 16, "
            f"expected an image size that is a multiple of {SIZE_STEP} px (Stage C grid a multiple of 3)."
        )


def snap_size(width: int, height: int, min_side: int = MIN_SIDE,
              max_side: int = MAX_SIDE) -> tuple[int, int, str | None]:
    """Snap to the nearest multiple of 128 px (ties round up), raising sides below `min_side` to it.

    Returns (width, height, warning) where warning says what changed, or is None. A snapped side above
    `max_side` raises SizeError.
    """
    def snap(side: int) -> int:
        return max((side + SIZE_STEP // 2) // SIZE_STEP * SIZE_STEP, min_side)

    w, h = snap(width), snap(height)
    if max(w, h) > max_side:
        raise SizeError(f"Image size {width}×{height} snaps to {w}×{h}, expected at most {max_side} px per side.")
    if (w, h) == (width, height):
        return w, h, None
    return w, h, (f"Image size {width}×{height} changed to {w}×{h}: sides must be multiples of {SIZE_STEP} px "
                  f"and at least {min_side} px.")
