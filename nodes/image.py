"""Stage A decode: Stage B latent -> IMAGE, optionally in tiles so large images fit small cards."""

import torch

from wuerstchen_core import memory, performance, pipeline

from .latents import stage_samples
from .spec import VQGAN, Input, NodeSpec, Output


def _decode(host, vqgan, samples, tile_size, fast_mode=False):
    where = "Würstchen Stage A Decode"
    z = stage_samples(samples, "B", f"{where}, input 'samples'")
    tile = tile_size // 4 if tile_size and 4 * max(z.shape[-2:]) > tile_size else None  # in latent cells
    height, width = 4 * z.shape[-2], 4 * z.shape[-1]
    device = host.load(vqgan, activations=memory.activation_bytes("vqgan", vqgan.model.cfg, 1, height, width,
                                                                  vqgan.dtype.itemsize, tile=tile))
    model = host.fast_model(vqgan, device) if fast_mode else vqgan.model
    bar = host.progress(z.shape[0])
    images = []
    with torch.inference_mode(), performance.compile_errors(where, enabled=fast_mode):
        for i in range(z.shape[0]):  # one image at a time: bounded memory, and a progress/interrupt point each
            img = pipeline.decode_stage_a(model, z[i:i + 1].to(device, vqgan.dtype), tile=tile)
            images.append(img.to(host.intermediate_device(), torch.float32))
            bar.update(i + 1)
    return (torch.cat(images).movedim(1, -1),)


STAGE_A_DECODE = NodeSpec(
    "WuerstchenStageADecode",
    "Würstchen Stage A Decode",
    "Decodes a Stage B latent into images with the VQGAN (latent × 0.3764, no quantisation, clamped to 0..1).",
    (Input("vqgan", VQGAN, "The Stage A VQGAN."),
     Input("samples", "LATENT", "Stage B latent from the Stage B sampler."),
     Input("tile_size", "INT", "Decode in tiles of this many px when the image is larger (0 = never tile). "
           "1024 lets 2048×2048 decode on an 8 GB card.", default=1024, min=0, max=8192, step=64),
     Input("fast_mode", "BOOLEAN", "Compile the VQGAN's blocks with torch.compile (one compile serves its 12 "
           "identical blocks): fewer, fused passes over each image on a GPU (no gain on a CPU). The first decode of "
           "each image or tile size compiles first (the console says so, and how long it took); needs Triton on a "
           "GPU.", default=False, optional=True)),
    (Output("image", "IMAGE", "Images [B,H,W,3] in 0..1."),),
    _decode,
)

NODES = (STAGE_A_DECODE,)
