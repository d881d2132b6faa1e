"""Samplers over an ε-predicting denoiser, in the style of k-diffusion's sampling.py.

A denoiser is `eps_fn(x, r) -> eps` with r a float tensor [B] in the latent dtype. Timesteps are a
descending list of r from (at most) 1 down to 0; the loop runs over timesteps[:-1], one model
evaluation each.

RNG order. Noise comes from CPU generators (one per image, or one for the batch) and is then moved
to the device, like the reference. The caller draws the initial latent first; then, per step:
  1. "ddpm" only: the step noise, drawn on every step including the last (where it is multiplied by 0);
  2. with a mask only, and only when the new r is above 0: the noise that re-noises the kept region.
"ddim" and "dpmpp_2m" draw nothing.
"""

import functools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from .errors import StageMismatchError, WuerstchenError
from .schedule import alphas_cumprod, check_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


class NoiseSource:
    """Standard-normal draws from CPU generators, moved to `device`.

    With one generator per image each image's noise is drawn with shape [1, ...] from its own
    generator into its row of the batch; with a single generator the whole batch is drawn at once. Both
    are exactly diffusers' `randn_tensor` with a list of generators / one generator.

    For a device other than the CPU (or with `background=True`) the draws run on worker threads, each
    generator always on the same worker, so each generator still yields its draws in order: a batch's
    images are drawn in parallel, and reserved draws (`reserve`) are drawn ahead while the device runs.
    Drawn inline, a batch-8 Stage B step's noise (8×4×256×256) left an H200 idle ≈ 12 ms before each
    step in fast mode (docs/benchmarks-history.md, run 12).
    """

    def __init__(self, generators: list[torch.Generator], device="cpu", dtype: torch.dtype = torch.float32,
                 background: bool | None = None):
        self.generators, self.device, self.dtype = list(generators), torch.device(device), dtype
        self.background = self.device.type != "cpu" if background is None else background
        self._slots: list[tuple[torch.Tensor, list[Future] | None]] = []  # reserved: staging, work (None: not started)

    def __call__(self, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape, dtype = tuple(shape), dtype or self.dtype
        if self._slots:
            z, pending = self._slots.pop(0)
            if (tuple(z.shape), z.dtype) != (shape, dtype):
                raise RuntimeError(f"NoiseSource: a {tuple(z.shape)} {z.dtype} draw was reserved and "
                                   f"{shape} {dtype} asked for; reserve exactly the draws that follow.")
        else:
            z, pending = self._staging(shape, dtype), None
        if pending is None:  # not started in the background: drawn now
            pending = self._start(z)
        for work in pending:
            work.result()
        return z.to(self.device, non_blocking=True)  # from pinned memory: no host sync per draw

    def reserve(self, count: int, shape, dtype: torch.dtype | None = None) -> None:
        """Allocate now the host staging (pinned on CUDA) of the next `count` draws of `shape` (after any
        reserved before), and in the background start drawing them in order; without the background each
        draw still happens when it is asked for. A pinned buffer per draw would instead cost a page-locked
        allocation, which waits for the device, whenever the previous upload is still queued behind the
        model."""
        shape, dtype = tuple(shape), dtype or self.dtype
        if count > 0:
            staging = self._staging((count, *shape), dtype)
            self._slots += [(z, self._start(z) if self.background else None) for z in staging.unbind(0)]

    def _staging(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")  # pinned: async uploads

    def _start(self, out: torch.Tensor) -> list[Future]:
        """Fill `out`: on the workers (returning their pending work) or here (returning none)."""
        rows = self._rows(out)
        if not self.background:
            _fill(rows)
            return []
        workers = _noise_workers()
        jobs: dict[int, list] = {}
        for i, (g, row) in enumerate(rows):
            jobs.setdefault(i % len(workers), []).append((g, row))
        return [workers[w].submit(_fill, job) for w, job in jobs.items()]

    def _rows(self, out: torch.Tensor) -> list[tuple[torch.Generator, torch.Tensor]]:
        if len(self.generators) == 1:
            return [(self.generators[0], out)]
        if len(self.generators) == out.shape[0]:
            return list(zip(self.generators, out.split(1)))
        raise StageMismatchError(
            f"Noise: got {len(self.generators)} seeds for a batch of {out.shape[0]}, expected one seed per image."
        )


def _fill(rows) -> None:
    for g, row in rows:  # ATen releases the GIL while it draws
        torch.randn(row.shape, generator=g, dtype=row.dtype, out=row)


@functools.cache
def _noise_workers() -> list[ThreadPoolExecutor]:
    """Single-thread executors, so the draws handed to one run in the order they were handed over.
    Generator i of a batch goes to worker i mod n: one generator's draws stay in order however many
    NoiseSources are in use, since each draw waits for the previous ones of its worker."""
    n = max(1, min(8, (os.cpu_count() or 1) - 1))
    return [ThreadPoolExecutor(max_workers=1, thread_name_prefix="wuerstchen-noise") for _ in range(n)]


def generators_for_seeds(seeds: list[int]) -> list[torch.Generator]:
    """One seeded CPU generator per image."""
    for seed in seeds:
        if not 0 <= seed < 2**64:
            raise WuerstchenError(f"Seed {seed}: expected an integer in [0, 2**64).")
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def cfg_denoiser(model_fn: ModelFn, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                 scale: float, prepare: Callable | None = None) -> Denoiser:
    """Classifier-free guidance around `model_fn(x, r, cond_dict)`.

    scale > 1: one batched call on cat([x, x]) with every condition as cat([cond, uncond]) (the
    reference's batch order), then eps = lerp(uncond, cond, scale) = uncond + scale·(cond − uncond).
    scale ≤ 1: a single conditional call, as in the reference (guidance off, not scaled).
    Each dict holds tensors batched along dim 0 with the batch of x, e.g. Stage B passes
    {"clip": ..., "effnet": ...} with zeros as its unconditional effnet. `prepare(cond_dict)`, when
    given, runs once here and model_fn gets its result instead of the dict (the network's per-run
    conditioning, which would otherwise be recomputed at every step).
    """
    prepare = prepare or (lambda k: k)
    if scale <= 1:
        prepared = prepare(cond)
        return lambda x, r: model_fn(x, r, prepared)
    both = prepare({k: torch.cat([cond[k], uncond[k]]) for k in cond})

    def eps_fn(x, r):
        eps_cond, eps_uncond = model_fn(torch.cat([x, x]), torch.cat([r, r]), both).chunk(2)
        return torch.lerp(eps_uncond, eps_cond, scale)

    return eps_fn


def noise_to(x0: torch.Tensor, r: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion to time r: √ᾱ(r)·x0 + √(1−ᾱ(r))·noise, in x0's dtype.

    At the end points the clamp of ᾱ is dropped (the true cosine ᾱ is 1 at r = 0 and 0 at r = 1), so
    r = 0 returns x0 exactly and r = 1 returns the noise exactly: img2img at denoise 1 is txt2img.
    """
    r = float(r)
    a = 1.0 if r <= 0 else 0.0 if r >= 1 else float(alphas_cumprod(torch.tensor([r])))
    return (x0.float() * math.sqrt(a) + noise.float() * math.sqrt(1 - a)).to(x0.dtype)


def sample(eps_fn: Denoiser, x: torch.Tensor, timesteps, sampler: str = "ddpm", noise: NoiseSource | None = None,
           x0_source: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           callback: Callback | None = None) -> torch.Tensor:
    """Denoise x from timesteps[0] to 0.

    x: the start latent (pure noise for txt2img; `noise_to(x0, timesteps[0], ...)` for img2img).
    noise: required for "ddpm" and for masks.
    mask: 1 = regenerate, 0 = keep, broadcastable to x. After each step the kept region becomes
    x0_source re-noised to the new r with fresh noise, and x0_source itself at r = 0 (soft masks blend).
    callback(step_index, total_steps, x, x0_estimate) runs after each step with the new x and the
    x0 estimate (x − √(1−ᾱ)·ε)/√ᾱ at the step's starting r (kept region from x0_source); it may raise
    to stop sampling.
    """
    if sampler not in SAMPLERS:
        raise WuerstchenError(f"Sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}.")
    if noise is None and (sampler == "ddpm" or mask is not None):
        raise ValueError(f"sample(): sampler {sampler!r}{' with a mask' if mask is not None else ''} needs a NoiseSource.")
    if mask is not None and x0_source is None:
        raise ValueError("sample(): a mask needs x0_source.")
    ts = check_timesteps(timesteps)
    steps, batch, dtype, device = len(ts) - 1, x.shape[0], x.dtype, x.device
    view = (batch,) + (1,) * (x.ndim - 1)
    rs = ts.tolist()
    # solver-side ᾱ at the exact (float32) times, as Python floats: no device tensors needed
    abar = alphas_cumprod(ts).tolist()
    if mask is not None:
        mask, x0_source = mask.to(device, dtype), x0_source.to(device, dtype)

    # r handed to the model: the timestep expanded to the batch and cast to the latent dtype, as the
    # reference does (exact in fp16). bf16 keeps r in float32: its 8-bit mantissa would put r·10000
    # on steps of 16-64 and visibly shift the r embedding.
    ts_dev = ts.to(device)
    r_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    r_model = [ts_dev[i].expand(batch).to(r_dtype) for i in range(steps)]
    if sampler == "ddpm":
        # per-step coefficients of the reference step, computed on the device before the loop:
        # ᾱ_t from the model-dtype r, ᾱ_prev from the float32 list
        ddpm = []
        for i in range(steps):
            a_t = alphas_cumprod(r_model[i]).view(view)
            r_prev = ts_dev[i + 1].expand(batch)
            a_prev = alphas_cumprod(r_prev).view(view)
            alpha = a_t / a_prev
            sigma = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt()
            ddpm.append(((1.0 / alpha).sqrt(), 1 - alpha, (1 - a_t).sqrt(), sigma, (r_prev != 0).float().view(view)))

        if mask is None:  # the loop's only draws: one per step, all known now (see NoiseSource.reserve)
            noise.reserve(steps, x.shape, x.dtype)

    lam = [0.5 * math.log(a / (1 - a)) for a in abar]  # log-SNR for dpmpp_2m
    x0_prev = None
    for i in range(steps):
        eps = eps_fn(x, r_model[i])
        a_t, a_n, last = abar[i], abar[i + 1], rs[i + 1] == 0
        if sampler != "ddpm" or callback is not None:
            x0 = (x.float() - math.sqrt(1 - a_t) * eps.float()) / math.sqrt(a_t)
        if sampler == "ddpm":
            c_mu, c_eps, c_den, sigma, nonzero = ddpm[i]
            mu = c_mu * (x - c_eps * eps / c_den)
            x_next = mu + sigma * noise(x.shape, x.dtype) * nonzero
        elif last:  # r = 0 is the clean end point for the deterministic solvers
            x_next = x0
        elif sampler == "ddim":
            x_next = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n) * eps.float()
        else:  # dpmpp_2m: data prediction, exponential integrator in λ; first step first order
            h = lam[i + 1] - lam[i]
            d = x0
            if x0_prev is not None:
                c = h / (lam[i] - lam[i - 1]) / 2  # 1/(2r), r = h_last/h
                d = (1 + c) * x0 - c * x0_prev
            x_next = math.sqrt((1 - a_n) / (1 - a_t)) * x.float() - math.sqrt(a_n) * math.expm1(-h) * d
            x0_prev = x0
        x = x_next.to(eps.dtype)

        if mask is not None:
            kept = x0_source if last else noise_to(x0_source, rs[i + 1], noise(x.shape, dtype))
            x = torch.lerp(kept, x, mask)
        if callback is not None:
            x0 = x0.to(dtype)
            callback(i, steps, x, x0 if mask is None else torch.lerp(x0_source, x0, mask))
    return x
