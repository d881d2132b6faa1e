"""Continuous-time cosine schedule of Würstchen v2 and its timestep lists.

Time r runs from 1 (pure noise) to 0 (clean). ᾱ(r) is the cosine schedule with offset s, normalised
by ᾱ(0) and clamped to [1e-4, 0.9999] so that the DDPM step never divides by zero. The arithmetic
follows the reference scheduler operation by operation (float32 tensors, the normaliser computed on
the CPU), so that our sampler reproduces it bit for bit on the same device.
"""

import functools
import math

import numpy as np
import torch

from .errors import WuerstchenError

S = 0.008
ALPHA_MIN, ALPHA_MAX = 1e-4, 0.9999


@functools.lru_cache(maxsize=None)
def _normaliser(s: float, device: torch.device) -> torch.Tensor:
    # cos²(s/(1+s)·π/2) as a float32 [1] tensor computed on the CPU, like the reference
    s_cpu = torch.tensor([s])
    return (torch.cos(s_cpu / (1 + s_cpu) * torch.pi * 0.5) ** 2).to(device)


def alphas_cumprod(r: torch.Tensor, s: float = S) -> torch.Tensor:
    """ᾱ(r) for a tensor of times; fp16/bf16 r is promoted, so the result is float32."""
    s_t = torch.full((1,), s, device=r.device)
    a = torch.cos((r + s_t) / (1 + s_t) * torch.pi * 0.5) ** 2 / _normaliser(s, r.device)
    return a.clamp(ALPHA_MIN, ALPHA_MAX)


def r_for_alphas_cumprod(a: torch.Tensor, s: float = S) -> torch.Tensor:
    """Inverse of `alphas_cumprod` inside the unclamped range (1e-4, 0.9999); float64 math."""
    a = a.double()
    norm = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return torch.acos((a * norm).sqrt()) * (2 / math.pi) * (1 + s) - s


def stage_c_preset() -> torch.Tensor:
    """The 30-value Stage C list (29 evaluations): 20 values over [1, 2/3], then 10 steps to 0."""
    ts = np.concatenate([np.linspace(1.0, 2 / 3, 20), np.linspace(2 / 3, 0.0, 11)[1:]])
    return torch.tensor(ts.tolist(), dtype=torch.float32)  # float64 -> float32 like the reference


def linear_timesteps(n: int) -> torch.Tensor:
    """linspace(1, 0, n+1): n model evaluations."""
    if n < 1:
        raise WuerstchenError(f"Sampler steps: got {n}, expected at least 1.")
    return torch.linspace(1.0, 0.0, n + 1)


def check_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of a custom list after checking it is strictly descending in [0, 1] and ends at 0."""
    ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float32).flatten()
    if len(ts) < 1 or ts[-1] != 0 or ts[0] > 1 or not bool((ts[1:] < ts[:-1]).all()):
        raise WuerstchenError(
            f"Timesteps {[round(t, 4) for t in ts.tolist()]}: expected a strictly descending list in [0, 1] ending at 0."
        )
    return ts


def parse_timesteps(spec: str | int) -> torch.Tensor:
    """'preset' (or 'stage_c') -> the Stage C preset; an integer n -> linear n steps; '1, 0.5, 0' -> that list."""
    text = str(spec).strip().lower()
    if text in ("preset", "stage_c"):
        return stage_c_preset()
    if text.isdigit():
        return linear_timesteps(int(text))
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise WuerstchenError(
            f"Timesteps {spec!r}: expected 'preset', a step count, or comma-separated times like '1, 0.5, 0'."
        ) from None
    return check_timesteps(torch.tensor(values))


def truncate_for_denoise(timesteps: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of `timesteps` for img2img with strength `denoise` ∈ [0, 1].

    It starts at the smallest timestep r ≥ denoise (within 1e-6), so there is never less noise than
    asked for. On linear_timesteps(N) that keeps the last ceil(denoise·N) steps; denoise 1 keeps the
    whole list and denoise 0 keeps only the final 0 (no model evaluation).
    """
    if not 0.0 <= denoise <= 1.0:
        raise WuerstchenError(f"Denoise strength: got {denoise}, expected a value in [0, 1].")
    ts = check_timesteps(timesteps)
    start = int((ts >= denoise - 1e-6).sum()) - 1
    return ts[max(start, 0):]
