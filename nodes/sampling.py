"""The two sampler nodes: Stage C "prior sampling" and Stage B "decoding"."""

import torch

from wuerstchen_core import memory, performance, pipeline, sizes
from wuerstchen_core.errors import StageMismatchError, WuerstchenError
from wuerstchen_core.sampling import SAMPLERS

from .conditioning import text_embedding
from .latents import latent_mask, make_latent, seeds_for, stage_samples
from .previews import stage_b_preview, stage_c_preview
from .spec import DECODER, PRIOR, VQGAN, Input, NodeSpec, Output, seed_input


def _reporter(host, preview):
    """A pipeline callback that reports progress (an interrupt point) and a preview of the x0 estimate."""
    state = {}
    preview = preview if host.wants_previews() else None

    def callback(step, total, x, x0):
        bar = state.setdefault("bar", host.progress(total))
        bar.update(step + 1, preview(x0) if preview is not None else None)

    return callback


def _image_size(grid) -> tuple[int, int] | None:
    """(height, width) of the valid image size whose Stage C grid is `grid`, or None. Text-to-image then
    starts from pure noise like the reference; other grids (and masks, denoise < 1) noise the latent itself."""
    height, width = sizes.image_size_for_stage_c(*grid)
    if height % sizes.SIZE_STEP or width % sizes.SIZE_STEP or not sizes.MIN_SIDE <= min(height, width) \
            or max(height, width) > sizes.MAX_SIDE or sizes.stage_c_grid(height, width) != tuple(grid):
        return None
    return height, width


def _common_inputs(steps_default, steps_tooltip, cfg_default, cfg_tooltip):
    return (
        seed_input(),
        Input("steps", "INT", steps_tooltip, default=steps_default, min=0 if steps_default == 0 else 1, max=1000),
        Input("cfg", "FLOAT", cfg_tooltip, default=cfg_default, min=0.0, max=30.0, step=0.1),
        Input("sampler", "COMBO", "ddpm is Würstchen's own ancestral sampler; ddim and dpmpp_2m are deterministic.",
              default="ddpm", options=SAMPLERS),
        Input("denoise", "FLOAT", "1.0 samples from pure noise; below 1 starts from the input latent (img2img).",
              default=1.0, min=0.0, max=1.0, step=0.01),
        Input("fast_mode", "BOOLEAN", "Compile the network's repeated blocks with torch.compile (CUDA graphs on a "
              "GPU) for about 2× faster steps at batch 1 (on an H200, the network compiled whole: Stage C 12.3 → "
              "7.0 ms, Stage B 24.4 → 10.5 ms). The first run compiles, and each new image size or batch compiles "
              "again: compiled whole, 90–120 s on an H200; its blocks, as now, compile 3–4× faster (measured on "
              "a CPU); the console says when it compiles and how long that took. Needs Triton on a GPU, a C++ compiler "
              "on the CPU.", default=False, optional=True),
        Input("cuda_graphs", "BOOLEAN", "Replay the network's steps from CUDA graphs, captured once per image size "
              "and batch with three ordinary steps instead of compiled: on an H200 the replayed steps took 7.7 ms "
              "(Stage C) and 11.5 ms (Stage B) against 12.3 and 24.4 ms plain, and a whole 1024² image 0.51 s "
              "(0.88 s with the capture) against fast mode's 0.415 s (compiled whole, in 120 s). CUDA only "
              "(elsewhere the plain steps run); not together with fast_mode.",
              default=False, optional=True),
    )


def _activations(stage, loaded, batch, stage_c_grid, guided) -> int:
    """The stage's activation estimate, so the host makes room for it next to the weights."""
    height, width = sizes.image_size_for_stage_c(*stage_c_grid)
    return memory.activation_bytes(stage, loaded.model.cfg, batch, height, width,
                                   loaded.dtype.itemsize, guided)


def _check_speed_options(where, fast_mode, cuda_graphs):
    if fast_mode and cuda_graphs:
        raise WuerstchenError(f"{where}: fast_mode and cuda_graphs are both on; expected at most one (each "
                              "removes the per-step launch cost its own way).")


def _network(host, loaded, device, fast_mode, cuda_graphs):
    if fast_mode:
        return host.fast_model(loaded, device)
    return host.graphed_model(loaded) if cuda_graphs else loaded.model


def _sample_c(host, prior, positive, negative, latent, seed, steps, cfg, sampler, denoise, mask=None,
              fast_mode=False, cuda_graphs=False):
    where = "Würstchen Stage C Sampler"
    _check_speed_options(where, fast_mode, cuda_graphs)
    x = stage_samples(latent, "C", f"{where}, input 'latent'")
    c = prior.model.cfg
    if x.shape[1] != c.c_in:
        raise StageMismatchError(f"{where}: latent has {x.shape[1]} channels, expected {c.c_in} for prior {prior.name}.")
    batch = x.shape[0]
    cond = text_embedding(positive, "bigG", batch, c.c_cond, f"{where}, input 'positive'")
    uncond = text_embedding(negative, "bigG", batch, c.c_cond, f"{where}, input 'negative'")
    m = latent_mask(latent, mask, x.shape, f"{where}, mask")
    size = _image_size(x.shape[-2:])
    from_noise = denoise >= 1.0 and m is None and size is not None
    height, width = size or (None, None)
    dtype = prior.dtype
    device = host.load(prior, activations=_activations("prior", prior, batch, x.shape[-2:], cfg > 1))
    with torch.inference_mode(), performance.compile_errors(where, enabled=fast_mode):
        out = pipeline.sample_stage_c(
            _network(host, prior, device, fast_mode, cuda_graphs), cond.to(device, dtype),
            uncond.to(device, dtype) if cfg > 1 else None,
            latent=None if from_noise else x.to(device, dtype), height=height, width=width,
            seeds=seeds_for(latent, seed, batch), steps=steps or None, cfg=cfg, sampler=sampler, denoise=denoise,
            mask=None if m is None else m.to(device, dtype), callback=_reporter(host, stage_c_preview))
    return (make_latent(out, "C", host, like=latent),)


STAGE_C_SAMPLER = NodeSpec(
    "WuerstchenStageCSampler",
    "Würstchen Stage C Sampler (prior)",
    "Prior sampling: denoises the 16-channel Stage C latent from the bigG text conditioning. Feed the result "
    "to the Stage B sampler's stage_c input.",
    (Input("prior", PRIOR, "The Stage C prior."),
     Input("positive", "CONDITIONING", "Prompt encoded with the bigG text encoder."),
     Input("negative", "CONDITIONING", "Negative prompt encoded with the bigG text encoder (used when cfg > 1)."),
     Input("latent", "LATENT", "Stage C latent: Würstchen Empty Latent, or EfficientNet Encode for img2img."),
     *_common_inputs(0, "Model evaluations; 0 uses Würstchen's 29-step Stage C preset, N > 0 a linear schedule.",
                     4.0, "Classifier-free guidance scale; active above 1."),
     Input("mask", "MASK", "Inpainting mask (1 = regenerate); overrides the latent's noise_mask.", optional=True)),
    (Output("stage_c", "LATENT", "Stage C latent (prior space)."),),
    _sample_c,
)


def _sample_b(host, decoder, positive, negative, stage_c, seed, steps, cfg, sampler, denoise,
              latent=None, mask=None, vqgan_for_preview=None, fast_mode=False, cuda_graphs=False):
    where = "Würstchen Stage B Sampler"
    _check_speed_options(where, fast_mode, cuda_graphs)
    c = decoder.model.cfg
    effnet = stage_samples(stage_c, "C", f"{where}, input 'stage_c'")
    if effnet.shape[1] != c.effnet_embd:
        raise StageMismatchError(f"{where}: stage_c has {effnet.shape[1]} channels, expected {c.effnet_embd} "
                                 f"for decoder {decoder.name}.")
    grid = sizes.stage_b_grid(*effnet.shape[-2:])
    x0 = None
    if latent is not None:
        x0 = stage_samples(latent, "B", f"{where}, input 'latent'")
        if x0.shape[0] != effnet.shape[0] and effnet.shape[0] == 1:
            effnet = effnet.expand(x0.shape[0], -1, -1, -1)
        if x0.shape[0] != effnet.shape[0]:
            raise StageMismatchError(f"{where}: latent batch is {x0.shape[0]} but stage_c batch is {effnet.shape[0]}, "
                                     "expected the same size.")
        if tuple(x0.shape[-2:]) != grid:
            hb, wb = x0.shape[-2:]
            raise StageMismatchError(f"{where}: latent is {wb}×{hb} (a {4 * wb}×{4 * hb} px image) but stage_c "
                                     f"decodes to {4 * grid[1]}×{4 * grid[0]} px, expected matching sizes.")
    elif denoise < 1.0:
        raise StageMismatchError(f"{where}: denoise {denoise} needs a Stage B latent at input 'latent' "
                                 "(from Stage A Encode), expected denoise 1.0 without one.")
    batch = effnet.shape[0]
    cond = text_embedding(positive, "H", batch, c.clip_embd, f"{where}, input 'positive'")
    uncond = text_embedding(negative, "H", batch, c.clip_embd, f"{where}, input 'negative'")
    m = latent_mask(latent, mask, (batch, 1) + grid, f"{where}, mask") if (latent is not None or mask is not None) else None
    if m is not None and x0 is None:
        raise StageMismatchError(f"{where}: a mask needs the image's Stage B latent at input 'latent' "
                                 "(from Stage A Encode), expected both or neither.")
    seeds = seeds_for(latent if latent is not None else stage_c, seed, batch)
    dtype = decoder.dtype
    device = host.load(decoder, vqgan_for_preview,
                       activations=_activations("decoder", decoder, batch, effnet.shape[-2:], cfg > 1))
    preview = None if vqgan_for_preview is None else lambda x0: stage_b_preview(vqgan_for_preview.model, x0)
    with torch.inference_mode(), performance.compile_errors(where, enabled=fast_mode):
        out = pipeline.sample_stage_b(
            _network(host, decoder, device, fast_mode, cuda_graphs), effnet.to(device, dtype),
            cond.to(device, dtype),
            uncond.to(device, dtype) if cfg > 1 else None,
            seeds=seeds, steps=steps, cfg=cfg, sampler=sampler, denoise=denoise,
            latent=None if x0 is None else x0.to(device, dtype), mask=None if m is None else m.to(device, dtype),
            callback=_reporter(host, preview))
    return (make_latent(out, "B", host, like=latent if latent is not None else stage_c),)


STAGE_B_SAMPLER = NodeSpec(
    "WuerstchenStageBSampler",
    "Würstchen Stage B Sampler (decoder)",
    "Decoding: denoises the 4-channel Stage B latent, conditioned on the Stage C latent and the H text "
    "conditioning. Decode the result with Würstchen Stage A Decode.",
    (Input("decoder", DECODER, "The Stage B decoder."),
     Input("positive", "CONDITIONING", "Prompt encoded with the H text encoder."),
     Input("negative", "CONDITIONING", "Negative prompt encoded with the H text encoder (used when cfg > 1)."),
     Input("stage_c", "LATENT", "Stage C latent from the Stage C sampler or EfficientNet Encode."),
     *_common_inputs(12, "Model evaluations on a linear schedule (Würstchen's default is 12).",
                     0.0, "Classifier-free guidance scale; active above 1 (Würstchen's default 0 = off)."),
     Input("latent", "LATENT", "Stage B latent from Stage A Encode, for img2img (denoise < 1) or inpainting.",
           optional=True),
     Input("mask", "MASK", "Inpainting mask (1 = regenerate); overrides the latent's noise_mask.", optional=True),
     Input("vqgan_for_preview", VQGAN, "Optional Stage A VQGAN, used only to decode step previews.", optional=True)),
    (Output("stage_b", "LATENT", "Stage B latent (decoder space)."),),
    _sample_b,
)

NODES = (STAGE_C_SAMPLER, STAGE_B_SAMPLER)
