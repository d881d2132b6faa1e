"""Latent nodes (empty Stage C latent, EfficientNet and Stage A encode) and the LATENT checks.

A LATENT is ComfyUI's {"samples": [B,C,h,w], "batch_index"?, "noise_mask"?} plus "wuerstchen_stage":
"C" (prior space, 16 channels) or "B" (decoder space, 4 channels). ComfyUI's latent batch nodes copy
the dict, so the stage key usually survives; when it is missing the channel count decides.
"""

import torch
import torch.nn.functional as F

from wuerstchen_core import pipeline, sizes
from wuerstchen_core.errors import StageMismatchError

from .spec import EFFNET, VQGAN, Input, NodeResult, NodeSpec, Output

STAGE_C_CHANNELS, STAGE_B_CHANNELS = 16, 4
CHANNELS = {"C": STAGE_C_CHANNELS, "B": STAGE_B_CHANNELS}
STAGE_NAME = {"C": "Stage C (prior)", "B": "Stage B (decoder)"}


def latent_stage(latent) -> str | None:
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        return None
    stage = latent.get("wuerstchen_stage")
    if stage in CHANNELS:
        return stage
    return next((s for s, c in CHANNELS.items() if latent["samples"].dim() == 4 and latent["samples"].shape[1] == c), None)


def stage_samples(latent, stage: str, where: str) -> torch.Tensor:
    """The samples of a LATENT that must belong to `stage`; a clear error naming both sides otherwise."""
    found = latent_stage(latent)
    if found != stage:
        if found is None:
            shape = list(latent["samples"].shape) if isinstance(latent, dict) and torch.is_tensor(latent.get("samples")) else None
            what = f"a latent of shape {shape}" if shape else f"a {type(latent).__name__}"
        else:
            what = f"a {STAGE_NAME[found]} latent"
        raise StageMismatchError(f"{where}: got {what}, expected a {STAGE_NAME[stage]} latent "
                                 f"({CHANNELS[stage]} channels).")
    return latent["samples"]


def seeds_for(latent, seed: int, batch: int) -> list[int]:
    """Image i uses seed + batch_index[i] (batch_index defaults to 0..B-1, as in ComfyUI)."""
    index = latent.get("batch_index") if isinstance(latent, dict) else None
    index = list(index) if index is not None else list(range(batch))
    if len(index) != batch:
        index = list(range(batch))
    return [(seed + int(i)) % 2**64 for i in index]


def latent_mask(latent, mask, shape, where: str) -> torch.Tensor | None:
    """[B,1,h,w] mask (1 = regenerate) from the optional MASK input, else latent["noise_mask"], resized to the latent grid."""
    m = mask if mask is not None else (latent.get("noise_mask") if isinstance(latent, dict) else None)
    if m is None:
        return None
    m = m.float().reshape(-1, 1, m.shape[-2], m.shape[-1])
    batch = shape[0]
    if m.shape[0] not in (1, batch) and batch % m.shape[0]:
        raise StageMismatchError(f"{where}: mask batch is {m.shape[0]} but the latent batch is {batch}, "
                                 "expected 1 or the same size.")
    m = F.interpolate(m, size=tuple(shape[-2:]), mode="bilinear", align_corners=False).clamp(0, 1)
    return m.repeat(batch // m.shape[0], 1, 1, 1)


def make_latent(samples, stage, host, like=None) -> dict:
    """A LATENT dict; keeps batch_index (and nothing else) from `like`."""
    out = {"samples": samples.to(host.intermediate_device(), torch.float32), "wuerstchen_stage": stage}
    if isinstance(like, dict) and like.get("batch_index") is not None and len(like["batch_index"]) == samples.shape[0]:
        out["batch_index"] = list(like["batch_index"])
    return out


def image_to_nchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> [B,3,H,W]."""
    return image.movedim(-1, 1)[:, :3].float()


def _empty(host, width, height, batch_size):
    w, h, warning = sizes.snap_size(width, height)
    hc, wc = sizes.stage_c_grid(h, w)
    samples = torch.zeros(batch_size, STAGE_C_CHANNELS, hc, wc, device=host.intermediate_device())
    return NodeResult((make_latent(samples, "C", host),), text=warning or f"{w}×{h}")


EMPTY_LATENT = NodeSpec(
    "WuerstchenEmptyLatent",
    "Würstchen Empty Latent (Stage C)",
    "The Stage C starting latent for a width × height image. Würstchen v2 needs sides that are multiples "
    "of 128 px: other sizes are snapped, and the node shows the size it used.",
    (Input("width", "INT", "Image width in px (snapped to a multiple of 128).", default=1024, min=256,
           max=sizes.MAX_SIDE, step=8),
     Input("height", "INT", "Image height in px (snapped to a multiple of 128).", default=1024, min=256,
           max=sizes.MAX_SIDE, step=8),
     Input("batch_size", "INT", "Number of images.", default=1, min=1, max=64)),
    (Output("latent", "LATENT", "Empty Stage C latent."),),
    _empty,
)


def _snapped_size(image_nchw):
    h, w = image_nchw.shape[-2:]
    return sizes.snap_size(w, h)


def _effnet_encode(host, effnet, image):
    x = image_to_nchw(image)
    w, h, warning = _snapped_size(x)
    device = host.load(effnet)
    with torch.inference_mode():
        samples = pipeline.encode_stage_c(effnet.model, x.to(device, effnet.dtype), w, h)
    return NodeResult((make_latent(samples, "C", host),), text=warning or f"{w}×{h}")


EFFNET_ENCODE = NodeSpec(
    "WuerstchenEffNetEncode",
    "Würstchen EfficientNet Encode (Stage C)",
    "Encodes images into the Stage C latent: for Stage C img2img (sampler denoise < 1) or, fed straight to "
    "the Stage B sampler, image variations. Sides are snapped to multiples of 128 px.",
    (Input("effnet", EFFNET, "The EfficientNet encoder."),
     Input("image", "IMAGE", "Images to encode.")),
    (Output("latent", "LATENT", "Stage C latent."),),
    _effnet_encode,
)


def _stage_a_encode(host, vqgan, image):
    x = image_to_nchw(image)
    w, h, warning = _snapped_size(x)
    if warning:
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    device = host.load(vqgan)
    with torch.inference_mode():
        samples = pipeline.encode_stage_a(vqgan.model, x.to(device, vqgan.dtype))
    return NodeResult((make_latent(samples, "B", host),), text=warning or f"{w}×{h}")


STAGE_A_ENCODE = NodeSpec(
    "WuerstchenStageAEncode",
    "Würstchen Stage A Encode (Stage B)",
    "Encodes images with the VQGAN into the Stage B latent, for Stage B img2img and inpainting. "
    "Sides are resized to multiples of 128 px.",
    (Input("vqgan", VQGAN, "The Stage A VQGAN."),
     Input("image", "IMAGE", "Images to encode.")),
    (Output("latent", "LATENT", "Stage B latent."),),
    _stage_a_encode,
)

NODES = (EMPTY_LATENT, EFFNET_ENCODE, STAGE_A_ENCODE)
