"""The three stages as plain functions over loaded models, used by the CLI and the nodes.

text -> sample_stage_c (prior space, (effnet + 1) / 42) -> sample_stage_b (Stage B space)
     -> decode_stage_a (image in 0..1). img2img enters through encode_stage_c / encode_stage_a.

Seeds are per stage and per image: image i uses its own CPU generator seeded `seed + batch_index[i]`,
so a batch equals the single runs it is made of, on any device. Every stage checks its output for
NaN/inf: in float16 it reruns once in bfloat16 (float32 where bfloat16 is unsupported) with a warning,
in other dtypes it raises, so an overflow never turns silently into a black image.
"""

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import memory
from .errors import SizeError, StageMismatchError, WuerstchenError
from .models.effnet import encode_stage_c
from .memory import tensor_slots
from .performance import restore_slots
from .sampling import NoiseSource, cfg_denoiser, generators_for_seeds, noise_to, sample
from .schedule import check_timesteps, linear_timesteps, stage_c_preset, truncate_for_denoise
from .sizes import check_stage_b_grid, image_size_for_stage_c, snap_size, stage_b_grid, stage_c_grid

__all__ = ["decode_stage_a", "encode_stage_a", "encode_stage_c", "generate", "image_seeds",
           "run_with_dtype_fallback", "sample_stage_b", "sample_stage_c", "stage_c_to_effnet"]

LATENT_MEAN, LATENT_STD = 42.0, 1.0  # prior space = (effnet + LATENT_STD) / LATENT_MEAN

Callback = Callable[[int, int, Tensor, Tensor], None]


# ---------------------------------------------------------------------------------------------
# helpers


def image_seeds(seed: int, batch_size: int, batch_index: Sequence[int] | None = None) -> list[int]:
    """Seed of every image of a batch: seed + batch_index[i] (batch_index defaults to 0..B-1)."""
    index = range(batch_size) if batch_index is None else list(batch_index)
    if len(index) != batch_size:
        raise StageMismatchError(f"batch_index has {len(index)} entries for a batch of {batch_size}; expected one per image.")
    return [seed + i for i in index]


def _place(module: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Move/cast `module` to device/dtype when given (defaults: where and what it already is); returns
    where it then is. A device without an index ("cuda") accepts a module on any device of that type.
    Weights stored in fp8 keep their storage: only the compute dtype changes."""
    p = compute_param(module)
    if device is not None and not memory.is_on(p, device):
        module.to(device)
    if dtype is not None and dtype != p.dtype:
        _cast_compute(module, dtype)
    p = compute_param(module)
    return p.device, p.dtype


def _cast_compute(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the module's floating weights to `dtype`, except those stored in fp8 (cast per call)."""
    module._apply(lambda t: t.to(dtype) if t.is_floating_point() and t.element_size() > 1 else t)


def compute_param(module: nn.Module) -> nn.Parameter:
    """A parameter in the module's compute dtype (weights stored in fp8 are cast per call)."""
    first = None
    for p in module.parameters():  # stops at the first: walking a whole network costs ms per stage
        if p.is_floating_point():
            if p.element_size() > 1:
                return p
            first = p if first is None else first
    return first


def _batched(t: Tensor, batch: int, what: str) -> Tensor:
    """A conditioning tensor broadcast from batch 1 to `batch`, or checked to already have it."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise StageMismatchError(f"{what} has batch {t.shape[0]} for {batch} images; expected 1 or {batch}.")


def _batch_size(seeds, batch_index, *tensors) -> int:
    """Images in the batch: one per seed (list) or batch index, else the largest tensor batch."""
    if not isinstance(seeds, int):
        return len(seeds)
    if batch_index is not None:
        return len(batch_index)
    return max((t.shape[0] for t in tensors if t is not None), default=1)


def _seed_list(seeds, batch: int, batch_index) -> list[int]:
    if isinstance(seeds, int):
        return image_seeds(seeds, batch, batch_index)
    return [int(s) for s in seeds]


def _schedule(timesteps, steps, default: Tensor, denoise: float) -> Tensor:
    ts = check_timesteps(timesteps) if timesteps is not None else linear_timesteps(steps) if steps else default
    return truncate_for_denoise(ts, denoise)


def _mask_to(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """A [B|1,1,h,w] mask (1 = regenerate) resized to x's grid."""
    if mask is None:
        return None
    mask = mask.to(x.device, torch.float32)
    mask = mask.view(1, 1, *mask.shape) if mask.ndim == 2 else mask.unsqueeze(1) if mask.ndim == 3 else mask
    if mask.shape[-2:] != x.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return mask.clamp(0, 1).to(x.dtype)


def _fallback_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" else torch.float32


def _checked_run(run, model: nn.Module, stage: str, batch: int, height: int, width: int, guided: bool,
                 tile, device, dtype) -> Tensor:
    """Run a stage after checking its estimated memory need against the device's free memory (CUDA
    only), turning a real out-of-memory error into a clear message that names what would fit."""
    need = memory.estimate(stage, model, batch=batch, height=height, width=width, guided=guided, tile=tile,
                           device=device, dtype=dtype)
    memory.check_fits(stage, need, device)
    with memory.translate_oom(stage, need, device):
        return run_with_dtype_fallback(run, model, memory.STAGES[stage])


def run_with_dtype_fallback(fn: Callable[[torch.dtype], Tensor], module: nn.Module, stage: str) -> Tensor:
    """Run `fn(dtype)` with `module` in its own dtype and return the (finite) result.

    When a float16 run yields NaN/inf (activations overflowing 65504), warn and rerun it once with the
    module cast to bfloat16 (float32 where bfloat16 is unsupported), then restore the module's weights
    exactly, in their own dtypes (float16, or float8 where Linear weights are stored in fp8). A
    non-finite result in any other dtype raises a WuerstchenError.
    """
    p = compute_param(module)
    dtype = p.dtype
    out = fn(dtype)  # checked once at the end: a per-step check would sync the host every step
    if bool(torch.isfinite(out).all()):
        return out
    if dtype != torch.float16:
        raise WuerstchenError(f"{stage} produced NaN/inf values in {dtype}; expected finite values "
                              "(the weights or the input latent are probably damaged).")
    fallback = _fallback_dtype(p.device)
    warnings.warn(f"{stage} overflowed in float16 (NaN/inf); rerunning it in {fallback}. "
                  "Use bf16 or fp32 for this model to avoid the second run.", RuntimeWarning, stacklevel=3)
    slots = tensor_slots(module)
    saved = [(t.detach().to("cpu", copy=True), t.device) for _, _, t in slots]  # the cast to bf16 is lossy
    _cast_compute(module, fallback)
    try:
        out = fn(fallback)
    finally:
        restore_slots(slots, [data.to(device) for data, device in saved])
    if not bool(torch.isfinite(out).all()):
        raise WuerstchenError(f"{stage} produced NaN/inf values in float16 and again in {fallback}; "
                              "expected finite values (the weights or the input latent are probably damaged).")
    return out


# ---------------------------------------------------------------------------------------------
# stages


@torch.no_grad()
def sample_stage_c(prior: nn.Module, cond: Tensor, uncond: Tensor | None = None, *, latent: Tensor | None = None,
                   height: int | None = None, width: int | None = None, seeds: int | Sequence[int] = 0,
                   batch_index: Sequence[int] | None = None, timesteps=None, steps: int | None = None,
                   cfg: float = 4.0, sampler: str = "ddpm", denoise: float = 1.0, mask: Tensor | None = None,
                   callback: Callback | None = None, device=None, dtype=None) -> Tensor:
    """Stage C: text embeddings [B|1,77,c_cond] -> latent [B,c_in,hc,wc] in the prior's space.

    Text-to-image (latent=None) at height×width, snapped to 128 px with a warning; img2img from
    `latent` with strength `denoise` (mask [B,1,h,w]: 1 = regenerate). The schedule is `timesteps`,
    else linear `steps`, else the Würstchen Stage C preset. `seeds`: one per image, or an int
    (image i gets seeds + batch_index[i]). Guidance is on when cfg > 1 and then needs `uncond`.
    """
    device, dtype = _place(prior, device, dtype)
    batch = _batch_size(seeds, batch_index, latent, cond)
    seed_list = _seed_list(seeds, batch, batch_index)
    if latent is None:
        if height is None or width is None:
            raise SizeError("Stage C text-to-image needs an image height and width; got none.")
        if height <= 0 or width <= 0:
            raise SizeError(f"Image size {width}×{height}: expected positive sides (multiples of 128 px).")
        width, height, note = snap_size(width, height)
        if note:
            warnings.warn(note, stacklevel=2)
        shape = (batch, prior.cfg.c_in, *stage_c_grid(height, width))
    else:
        if latent.ndim != 4 or latent.shape[1] != prior.cfg.c_in:
            raise StageMismatchError(f"Stage C got a latent of shape {tuple(latent.shape)}; expected "
                                     f"[batch, {prior.cfg.c_in}, h, w] from Stage C or the EfficientNet encoder.")
        shape = (batch, *latent.shape[1:])
        latent = _batched(latent, batch, "The Stage C latent")
    if mask is not None and latent is None:
        raise StageMismatchError("Stage C got a mask without a latent; expected the latent the mask applies to.")
    ts = _schedule(timesteps, steps, stage_c_preset(), denoise if latent is not None else 1.0)
    if cfg > 1 and uncond is None:
        raise StageMismatchError(f"Stage C guidance {cfg} needs a negative (unconditional) text embedding; got none.")

    def run(dt):
        noise = NoiseSource(generators_for_seeds(seed_list), device, dt)
        noise.reserve(1, shape)  # the start latent, drawn in the background while the conditioning is prepared
        c = {"clip": _batched(cond, batch, "The Stage C text embedding").to(device, dt)}
        u = {"clip": _batched(uncond, batch, "The Stage C negative embedding").to(device, dt)} if cfg > 1 else None
        eps_fn = cfg_denoiser(lambda x, r, k: prior(x, r, cond=k), c, u, cfg,
                              prepare=lambda k: prior.condition(k["clip"]))
        x = noise(shape)
        x0 = None if latent is None else latent.to(device, dt)
        if x0 is not None:
            x = noise_to(x0, float(ts[0]), x)
        return sample(eps_fn, x, ts, sampler, noise=noise, x0_source=x0,
                      mask=_mask_to(mask, x), callback=callback)

    h, w = image_size_for_stage_c(*shape[-2:])
    return _checked_run(run, prior, "prior", shape[0], h, w, cfg > 1, None, device, dtype)


def stage_c_to_effnet(latent: Tensor) -> Tensor:
    """Prior space -> the raw EfficientNet features Stage B is conditioned on: latent·42 − 1."""
    return latent * LATENT_MEAN - LATENT_STD


@torch.no_grad()
def sample_stage_b(decoder: nn.Module, stage_c_latent: Tensor, cond: Tensor, uncond: Tensor | None = None, *,
                   seeds: int | Sequence[int] = 0, batch_index: Sequence[int] | None = None, steps: int = 12,
                   timesteps=None, cfg: float = 0.0, sampler: str = "ddpm", denoise: float = 1.0,
                   latent: Tensor | None = None, mask: Tensor | None = None, callback: Callback | None = None,
                   device=None, dtype=None) -> Tensor:
    """Stage B: Stage C latent [B|1,16,hc,wc] + text [B|1,77,clip_embd] -> latent [B,4,hb,wb].

    The grid is int(hc·10.67) × int(wc·10.67), or the shape of `latent` for img2img. Each image is
    paired with its own text embedding and effnet map (a single one is broadcast). With cfg > 1 the
    unconditional pass sees `uncond` and an all-zero effnet map.
    """
    device, dtype = _place(decoder, device, dtype)
    if stage_c_latent.ndim != 4 or stage_c_latent.shape[1] != decoder.cfg.effnet_embd:
        raise StageMismatchError(f"Stage B got a Stage C latent of shape {tuple(stage_c_latent.shape)}; expected "
                                 f"[batch, {decoder.cfg.effnet_embd}, h, w].")
    batch = _batch_size(seeds, batch_index, latent, stage_c_latent, cond)
    seed_list = _seed_list(seeds, batch, batch_index)
    if latent is None:
        shape = (batch, decoder.cfg.c_in, *stage_b_grid(*stage_c_latent.shape[-2:]))
    else:
        if latent.ndim != 4 or latent.shape[1] != decoder.cfg.c_in:
            raise StageMismatchError(f"Stage B got a latent of shape {tuple(latent.shape)}; expected "
                                     f"[batch, {decoder.cfg.c_in}, h, w] from Stage B or the VQGAN encoder.")
        shape = (batch, *latent.shape[1:])
        latent = _batched(latent, batch, "The Stage B latent")
    if mask is not None and latent is None:
        raise StageMismatchError("Stage B got a mask without a latent; expected the latent the mask applies to.")
    check_stage_b_grid(*shape[-2:])
    ts = _schedule(timesteps, steps, linear_timesteps(12), denoise if latent is not None else 1.0)
    if cfg > 1 and uncond is None:
        raise StageMismatchError(f"Stage B guidance {cfg} needs a negative (unconditional) text embedding; got none.")
    effnet = stage_c_to_effnet(_batched(stage_c_latent, batch, "The Stage C latent").to(device, torch.float32))

    def run(dt):
        noise = NoiseSource(generators_for_seeds(seed_list), device, dt)
        noise.reserve(1, shape)  # the start latent, drawn in the background while the conditioning is prepared
        c = {"clip": _batched(cond, batch, "The Stage B text embedding").to(device, dt), "effnet": effnet.to(dt)}
        u = None
        if cfg > 1:
            u = {"clip": _batched(uncond, batch, "The Stage B negative embedding").to(device, dt),
                 "effnet": torch.zeros_like(c["effnet"])}
        eps_fn = cfg_denoiser(lambda x, r, k: decoder(x, r, cond=k), c, u, cfg,
                              prepare=lambda k: decoder.condition(k["effnet"], k["clip"], shape[-2:]))
        x = noise(shape)
        x0 = None if latent is None else latent.to(device, dt)
        if x0 is not None:
            x = noise_to(x0, float(ts[0]), x)
        return sample(eps_fn, x, ts, sampler, noise=noise, x0_source=x0,
                      mask=_mask_to(mask, x), callback=callback)

    h, w = 4 * shape[-2], 4 * shape[-1]
    return _checked_run(run, decoder, "decoder", shape[0], h, w, cfg > 1, None, device, dtype)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size), spread evenly, neighbours overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(n: int, overlap: int, up: bool, down: bool, device) -> Tensor:
    """Blend weights along one tile side. At an edge shared with another tile the outer quarter of the
    overlap gets weight 0 (those pixels see the tile's replication padding instead of the neighbour),
    the middle half ramps linearly to 1; edges on the image border keep weight 1."""
    margin = overlap // 4
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(n, device=device)
    span = max(overlap - 2 * margin, 1)
    if up:
        w = torch.minimum(w, ((i - margin) / span).clamp(0, 1))
    if down:
        w = torch.minimum(w, ((n - i - margin) / span).clamp(0, 1))
    return w


def _decode_tiled(vqgan: nn.Module, z: Tensor, tile: int, overlap: int) -> Tensor:
    """Decode latent tiles of tile×tile, blending overlaps linearly; memory is bounded by one tile."""
    (h, w), out, weight = z.shape[-2:], None, None
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for y in ys:
        for x in xs:
            zt = z[:, :, y:y + tile, x:x + tile]
            part = vqgan.decode(zt).float()
            f = part.shape[-1] // zt.shape[-1]  # image px per latent px
            if out is None:
                out = z.new_zeros((z.shape[0], part.shape[1], h * f, w * f), dtype=torch.float32)
                weight = z.new_zeros((1, 1, h * f, w * f), dtype=torch.float32)
            th, tw = part.shape[-2:]
            wy = _ramp(th, overlap * f, y > 0, y + tile < h, z.device)
            wx = _ramp(tw, overlap * f, x > 0, x + tile < w, z.device)
            m = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * f:y * f + th, x * f:x * f + tw] += part * m
            weight[:, :, y * f:y * f + th, x * f:x * f + tw] += m
    return out / weight


@torch.no_grad()
def decode_stage_a(vqgan: nn.Module, latent: Tensor, tile: int | None = None, overlap: int | None = None, *,
                   device=None, dtype=None) -> Tensor:
    """Stage B latent [B,4,h,w] -> float32 image [B,3,4h,4w] clamped to 0..1 (×0.3764 is inside decode).

    tile: decode latent tiles of at most tile×tile (e.g. 128 for a 2048 px image), overlapping by
    `overlap` latent px (default tile // 4) and blended linearly, so memory stays bounded. The tiles'
    outer overlap quarter is discarded, so an overlap of 4× the VQGAN's receptive radius (≈ 14 latent px
    for the public one) makes the seams invisible. A tile covering the whole latent decodes in one piece.
    """
    device, dtype = _place(vqgan, device, dtype)
    if latent.ndim != 4 or latent.shape[1] != vqgan.cfg.latent_channels:
        raise StageMismatchError(f"Stage A got a latent of shape {tuple(latent.shape)}; expected "
                                 f"[batch, {vqgan.cfg.latent_channels}, h, w] from Stage B.")
    if tile is not None and tile < 8:
        raise SizeError(f"Stage A tile size {tile}: expected at least 8 latent pixels (32 image px).")
    overlap = tile // 4 if tile is not None and overlap is None else overlap
    if tile is not None and not 0 <= overlap < tile:
        raise SizeError(f"Stage A tile overlap {overlap}: expected 0 ≤ overlap < tile size {tile}.")
    latent = latent.to(device)

    def run(dt):
        z = latent.to(dt)
        # cuDNN's default ConvTranspose2d algorithms are not run-to-run deterministic on CUDA
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True,
                                        allow_tf32=torch.backends.cudnn.allow_tf32):
            if tile is None or (tile >= z.shape[-2] and tile >= z.shape[-1]):
                return vqgan.decode(z).float()
            return _decode_tiled(vqgan, z, tile, overlap)

    b, _, h, w = latent.shape
    return _checked_run(run, vqgan, "vqgan", b, 4 * h, 4 * w, False, tile, device, dtype).clamp(0, 1)


@torch.no_grad()
def encode_stage_a(vqgan: nn.Module, images: Tensor, *, device=None, dtype=None) -> Tensor:
    """Images [B,3,H,W] in 0..1 (H, W multiples of 4) -> Stage B latent [B,4,H/4,W/4]."""
    device, dtype = _place(vqgan, device, dtype)
    if images.ndim != 4 or images.shape[1] != 3:
        raise StageMismatchError(f"Stage A encode got images of shape {tuple(images.shape)}; expected [batch, 3, H, W].")
    if images.shape[-2] % 4 or images.shape[-1] % 4:
        raise SizeError(f"Stage A encode got a {images.shape[-1]}×{images.shape[-2]} image; expected sides that "
                        "are multiples of 4 (of 128 for a full Stage B round trip).")
    return vqgan.encode(images.to(device, dtype))


# ---------------------------------------------------------------------------------------------
# text -> image


def encode_prompt(encoder, prompt: str, negative_prompt: str, guided: bool) -> tuple[Tensor, Tensor | None]:
    """(cond [1,77,D], uncond [1,77,D] or None without guidance) from a TextEncoder; both prompts go
    through one forward, which at batch 1 costs what one prompt does (it is launch-bound)."""
    if not guided:
        return encoder.encode([prompt]), None
    both = encoder.encode([prompt, negative_prompt])
    return both[:1], both[1:]


def generate(prior: nn.Module, decoder: nn.Module, vqgan: nn.Module, prior_text, decoder_text, prompt: str,
             negative_prompt: str = "", *, width: int = 1024, height: int = 1024, batch: int = 1, seed: int = 0,
             decoder_seed: int | None = None, prior_steps: int | None = None, prior_timesteps=None,
             prior_cfg: float = 4.0, decoder_steps: int = 12, decoder_cfg: float = 0.0, sampler: str = "ddpm",
             tile: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> Tensor:
    """Prompt -> float32 images [batch,3,H,W] in 0..1 through all three stages.

    prior_text / decoder_text: TextEncoders (CLIP bigG / CLIP H). Image i uses seed + i in Stage C and
    decoder_seed + i (default: seed + i) in Stage B. prior_steps=None with no prior_timesteps: the
    Stage C preset. progress(stage, step, total) is called after each step ("Stage C", "Stage B") and
    once for "Stage A".
    """
    if batch < 1:
        raise WuerstchenError(f"Batch size {batch}: expected at least 1.")

    def report(stage):
        return None if progress is None else lambda i, n, x, x0: progress(stage, i + 1, n)

    seeds = image_seeds(seed, batch)
    c_cond, c_uncond = encode_prompt(prior_text, prompt, negative_prompt, prior_cfg > 1)
    c = sample_stage_c(prior, c_cond, c_uncond, height=height, width=width, seeds=seeds,
                       timesteps=prior_timesteps, steps=prior_steps, cfg=prior_cfg, sampler=sampler,
                       callback=report("Stage C"))
    b_cond, b_uncond = encode_prompt(decoder_text, prompt, negative_prompt, decoder_cfg > 1)
    b = sample_stage_b(decoder, c, b_cond, b_uncond, seeds=image_seeds(seed if decoder_seed is None else decoder_seed, batch),
                       steps=decoder_steps, cfg=decoder_cfg, sampler=sampler, callback=report("Stage B"))
    images = decode_stage_a(vqgan, b, tile=tile)
    if progress is not None:
        progress("Stage A", 1, 1)
    return images
