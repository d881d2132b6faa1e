"""Step previews: a colour projection of the Stage C x0 estimate, a small Stage A decode of the Stage B one.

Stage C colours. No fitted latent→RGB map exists for Würstchen v2's prior space (ComfyUI's SC_Prior
factors belong to Stable Cascade's different EfficientNet), and fitting one needs the real weights and
an image set. So the map is a fixed, data-free choice made to show *composition*: each of the 16
channels gets a colour evenly spaced around the hue circle (channel k at angle 2πk/16), applied to the
x0 estimate after standardising every channel over the image. Regions whose features differ get
different colours, and the layout appears early in sampling; the colours themselves carry no meaning.
A least-squares fit (latents of real images → their downsampled RGB) could replace `STAGE_C_RGB`.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wuerstchen_core import pipeline

STAGE_C_RGB = torch.tensor([[math.cos(2 * math.pi * k / 16 - phase) for phase in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
                            for k in range(16)])  # [16, 3]
PREVIEW_SIDE = 256  # px of the Stage B preview's long side (Stage A decodes a downscaled x0)


def to_pil(rgb: torch.Tensor) -> Image.Image:
    """[3,H,W] in 0..1 -> PIL RGB."""
    return Image.fromarray((rgb.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8))


def stage_c_preview(x0: torch.Tensor) -> Image.Image:
    """The first image's x0 estimate [16,h,w] as a colour map, enlarged 8× (nearest)."""
    z = x0[0].float().cpu()
    z = (z - z.mean((1, 2), keepdim=True)) / (z.std((1, 2), keepdim=True) + 1e-6)
    rgb = torch.einsum("chw,cd->dhw", z[: len(STAGE_C_RGB)], STAGE_C_RGB[: z.shape[0]])
    rgb = 0.5 + (rgb - rgb.mean()) / (4 * rgb.std() + 1e-6)
    return to_pil(F.interpolate(rgb[None], scale_factor=8, mode="nearest")[0])


def stage_b_preview(vqgan, x0: torch.Tensor) -> Image.Image:
    """Decode the first image's x0 estimate with Stage A at about PREVIEW_SIDE px."""
    lat = x0[:1]
    side = PREVIEW_SIDE // 4
    if max(lat.shape[-2:]) > side:
        scale = side / max(lat.shape[-2:])
        size = (max(1, round(lat.shape[-2] * scale)), max(1, round(lat.shape[-1] * scale)))
        lat = F.interpolate(lat.float(), size=size, mode="area")
    param = next(vqgan.parameters())
    with torch.inference_mode():
        img = pipeline.decode_stage_a(vqgan, lat.to(param.device, param.dtype))
    return to_pil(img[0])
