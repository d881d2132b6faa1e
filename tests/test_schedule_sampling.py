"""Schedule and samplers against diffusers' DDPMWuerstchenScheduler (test-only oracle)."""

import ast
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm_wuerstchen import DDPMWuerstchenScheduler
from diffusers.utils.torch_utils import randn_tensor

from wuerstchen_core import sampling
from wuerstchen_core.errors import StageMismatchError, WuerstchenError
from wuerstchen_core.sampling import NoiseSource, cfg_denoiser, generators_for_seeds, noise_to, sample
from wuerstchen_core.schedule import (alphas_cumprod, linear_timesteps, parse_timesteps, stage_c_preset,
                                      truncate_for_denoise)

SHAPE = (16, 6, 5)  # per-image latent shape


def reference_stage_c_timesteps() -> list:
    """DEFAULT_STAGE_C_TIMESTEPS; read from the module's source if the pipeline module cannot import
    here (it imports transformers' CLIP, which needs a torchvision matching torch)."""
    name = "diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior"
    try:
        return importlib.import_module(name).DEFAULT_STAGE_C_TIMESTEPS
    except (ImportError, RuntimeError):
        tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
        node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "DEFAULT_STAGE_C_TIMESTEPS")
        return eval(compile(ast.Expression(node.value), name, "eval"), {"np": np})


def fake_eps_fn(dtype=torch.float32):
    """A fixed random linear map of x and r (deterministic, depends on both)."""
    g = torch.Generator().manual_seed(1234)
    w = (torch.randn(SHAPE[0], SHAPE[0], generator=g) / 4).to(dtype)
    b = torch.randn(SHAPE[0], 1, 1, generator=g).to(dtype)
    return lambda x, r: torch.einsum("oc,bchw->bohw", w, x) + r.view(-1, 1, 1, 1) * b


def reference_loop(eps_fn, timesteps, generator, batch, dtype=torch.float32):
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(timesteps=timesteps)
    x = randn_tensor((batch, *SHAPE), generator=generator, device=torch.device("cpu"), dtype=dtype)
    for t in sched.timesteps[:-1]:
        r = t.expand(batch).to(dtype)
        x = sched.step(eps_fn(x, r), r, x, generator=generator).prev_sample
    return x


def our_loop(eps_fn, timesteps, gens, batch, dtype=torch.float32, sampler="ddpm", **kw):
    noise = NoiseSource(gens, dtype=dtype)
    return sample(eps_fn, noise((batch, *SHAPE)), timesteps, sampler, noise, **kw)


# --- schedule ---------------------------------------------------------------------------------------

def test_alphas_cumprod_equals_reference_and_documented_values():
    sched = DDPMWuerstchenScheduler()
    r = torch.linspace(0, 1, 1001)
    assert torch.equal(alphas_cumprod(r), sched._alpha_cumprod(r, "cpu"))
    r16 = r.half()
    assert torch.equal(alphas_cumprod(r16), sched._alpha_cumprod(r16, "cpu"))
    assert alphas_cumprod(r16).dtype == torch.float32
    got = alphas_cumprod(torch.tensor([1.0, 2 / 3, 0.5, 0.25, 0.0])).tolist()
    assert got == pytest.approx([1e-4, 0.2464, 0.4938, 0.8470, 0.9999], abs=1e-4)


def test_stage_c_preset_is_reference_list():
    preset = stage_c_preset()
    assert preset.dtype == torch.float32 and preset.shape == (30,)
    assert torch.equal(preset, torch.Tensor(reference_stage_c_timesteps()))


def test_linear_and_parsed_timesteps():
    assert torch.equal(linear_timesteps(12), torch.linspace(1.0, 0.0, 13))
    assert torch.equal(parse_timesteps("preset"), stage_c_preset())
    assert torch.equal(parse_timesteps(" 12 "), linear_timesteps(12))
    assert parse_timesteps("1, 0.5, 0").tolist() == [1.0, 0.5, 0.0]
    for bad in ("1, 0.5", "0.5, 0.7, 0", "1,1,0", "2, 0", "abc", "0"):
        with pytest.raises(WuerstchenError):
            parse_timesteps(bad)


def test_truncate_for_denoise():
    ts = linear_timesteps(10)
    assert torch.equal(truncate_for_denoise(ts, 1.0), ts)
    for d, steps in [(0.3, 3), (0.35, 4), (0.01, 1), (0.0, 0), (0.999, 10)]:
        assert len(truncate_for_denoise(ts, d)) - 1 == steps == math.ceil(round(d * 10, 6))
    # non-uniform list: starts at the smallest timestep >= d
    tail = truncate_for_denoise(stage_c_preset(), 0.5)
    assert tail[0].item() == pytest.approx(8 / 15) and len(tail) == 9
    with pytest.raises(WuerstchenError):
        truncate_for_denoise(ts, 1.5)


# --- ddpm against the reference loop ----------------------------------------------------------------

@pytest.mark.parametrize("timesteps", [stage_c_preset(), linear_timesteps(12)], ids=["preset", "linear12"])
def test_ddpm_batch1_bit_exact(timesteps):
    eps_fn = fake_eps_fn()
    ref = reference_loop(eps_fn, timesteps, torch.Generator().manual_seed(7), 1)
    ours = our_loop(eps_fn, timesteps, generators_for_seeds([7]), 1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("timesteps", [stage_c_preset(), linear_timesteps(12)], ids=["preset", "linear12"])
def test_ddpm_batch3_generator_list_bit_exact(timesteps):
    eps_fn = fake_eps_fn()
    ref = reference_loop(eps_fn, timesteps, generators_for_seeds([1, 2, 3]), 3)
    ours = our_loop(eps_fn, timesteps, generators_for_seeds([1, 2, 3]), 3)
    assert torch.equal(ours, ref)
    # image i depends only on seed i
    alone = our_loop(eps_fn, timesteps, generators_for_seeds([2]), 1)
    assert torch.equal(ours[1:2], alone)


def test_bf16_models_get_float32_r():
    # bf16 r would quantise r·10000 to steps of 16-64; the sampler keeps r in float32 for bf16 latents
    seen = []

    def eps_fn(x, r):
        seen.append(r.dtype)
        return torch.zeros_like(x)

    x = torch.zeros(1, *SHAPE, dtype=torch.bfloat16)
    sample(eps_fn, x, linear_timesteps(2), "ddim")
    assert seen == [torch.float32, torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16])
def test_ddpm_reduced_precision_bit_exact(dtype):
    # model-dtype r for ᾱ_t, float32 r_prev, float32 step math, noise and result in the model dtype
    eps_fn = fake_eps_fn(dtype)
    ts = linear_timesteps(6)
    ref = reference_loop(eps_fn, ts, generators_for_seeds([5, 6]), 2, dtype)
    ours = our_loop(eps_fn, ts, generators_for_seeds([5, 6]), 2, dtype)
    assert ours.dtype == dtype and torch.equal(ours, ref)


def test_rng_draw_order():
    eps_fn, ts = fake_eps_fn(), linear_timesteps(5)
    draw = lambda g: torch.randn((1, *SHAPE), generator=g)
    # ddpm: initial latent + one draw per step (last included)
    (g,) = generators_for_seeds([3])
    our_loop(eps_fn, ts, [g], 1)
    expect = torch.Generator().manual_seed(3)
    for _ in range(1 + 5):
        draw(expect)
    assert torch.equal(draw(g), draw(expect))
    # ddim: only the initial latent
    (g,) = generators_for_seeds([3])
    our_loop(eps_fn, ts, [g], 1, sampler="ddim")
    expect = torch.Generator().manual_seed(3)
    draw(expect)
    assert torch.equal(draw(g), draw(expect))
    # ddpm + mask: per step the step noise, then the re-noise draw while the new r > 0
    (g,) = generators_for_seeds([3])
    our_loop(eps_fn, ts, [g], 1, x0_source=torch.zeros(1, *SHAPE), mask=torch.zeros(1, 1, *SHAPE[1:]))
    expect = torch.Generator().manual_seed(3)
    for _ in range(1 + 5 + 4):
        draw(expect)
    assert torch.equal(draw(g), draw(expect))


def test_noise_source_seed_count_mismatch():
    with pytest.raises(StageMismatchError):
        NoiseSource(generators_for_seeds([1, 2]))((3, *SHAPE))
    with pytest.raises(WuerstchenError):
        generators_for_seeds([-1])


# --- cfg --------------------------------------------------------------------------------------------

def test_cfg_denoiser():
    calls = []

    def model_fn(x, r, cond):
        calls.append((x.shape[0], r.clone(), {k: v.clone() for k, v in cond.items()}))
        return x * cond["clip"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + cond["effnet"].sum() + r.view(-1, 1, 1, 1)

    x, r = torch.randn(2, *SHAPE), torch.full((2,), 0.5)
    cond = {"clip": torch.randn(2, 7, 3), "effnet": torch.randn(2, 4, 2, 2)}
    uncond = {"clip": torch.randn(2, 7, 3), "effnet": torch.zeros(2, 4, 2, 2)}

    eps = cfg_denoiser(model_fn, cond, uncond, 4.0)(x, r)
    assert len(calls) == 1 and calls[0][0] == 4
    assert torch.equal(calls[0][2]["clip"], torch.cat([cond["clip"], uncond["clip"]]))
    assert torch.equal(calls[0][2]["effnet"], torch.cat([cond["effnet"], uncond["effnet"]]))
    e_c, e_u = model_fn(torch.cat([x, x]), torch.cat([r, r]), {k: torch.cat([cond[k], uncond[k]]) for k in cond}).chunk(2)
    assert torch.equal(eps, torch.lerp(e_u, e_c, 4.0))
    assert torch.allclose(eps, e_u + 4.0 * (e_c - e_u), atol=1e-5)

    calls.clear()
    eps1 = cfg_denoiser(model_fn, cond, uncond, 1.0)(x, r)
    assert len(calls) == 1 and calls[0][0] == 2 and torch.equal(eps1, model_fn(x, r, cond))


# --- deterministic solvers --------------------------------------------------------------------------

def gaussian_oracle(mu, s):
    """Exact ε-prediction for data ~ N(mu, s²) per element under the (clamped) schedule."""
    def eps_fn(x, r):
        a = alphas_cumprod(r).view(-1, 1, 1, 1).double()
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x.double() - a.sqrt() * mu)
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()
    return eps_fn


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_solvers_return_x0_for_point_data(sampler):
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    def eps_fn(x, r):  # data is the single point x0
        a = alphas_cumprod(r).view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    out = sample(eps_fn, torch.randn(2, *SHAPE), linear_timesteps(5), sampler)
    assert torch.allclose(out, x0, atol=1e-4)


def test_solver_order_on_gaussian_data():
    """Against the exact probability-flow path of N(mu, s²) data, which keeps z = (x − √ᾱ·mu)/√(ᾱs² + 1 − ᾱ)
    fixed: ddim converges at first order, dpmpp_2m at second order and beats ddim at few steps."""
    mu, s = 0.7, 0.2
    eps_fn = gaussian_oracle(mu, s)
    z = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def errors(sampler, n):  # max error at r = 0.5 and of the final x0 estimate
        ts = linear_timesteps(n)
        a = alphas_cumprod(ts.double()).tolist()
        exact = [math.sqrt(ak) * mu + math.sqrt(ak * s**2 + 1 - ak) * z for ak in a]
        mid = []
        out = sample(eps_fn, exact[0].float(), ts, sampler,
                     callback=lambda i, _, x, __: mid.append(x) if i + 1 == n // 2 else None)
        # both solvers end on the x0 estimate at the last r > 0: compare with that estimate on the exact path
        last = exact[n - 1]
        eps_last = eps_fn(last.float(), ts[n - 1].expand(1)).double()
        x0_exact = (last - math.sqrt(1 - a[n - 1]) * eps_last) / math.sqrt(a[n - 1])
        return (mid[0].double() - exact[n // 2]).abs().max().item(), (out.double() - x0_exact).abs().max().item()

    (ddim8, ddim8_end), (dpm8, dpm8_end) = errors("ddim", 8), errors("dpmpp_2m", 8)
    ddim32, dpm32 = errors("ddim", 32)[0], errors("dpmpp_2m", 32)[0]
    assert dpm8 < ddim8 and dpm8_end < 0.5 * ddim8_end
    assert 3 < ddim8 / ddim32 < 6  # first order: ~4x less error for 4x the steps
    assert dpm8 / dpm32 > 10  # second order: ~16x


# --- img2img, masks, callbacks ----------------------------------------------------------------------

def test_noise_to_end_points():
    x0, z = torch.randn(1, *SHAPE), torch.randn(1, *SHAPE)
    assert torch.equal(noise_to(x0, 1.0, z), z) and torch.equal(noise_to(x0, 0.0, z), x0)
    a = alphas_cumprod(torch.tensor([0.4])).item()
    assert torch.allclose(noise_to(x0, 0.4, z), a**0.5 * x0 + (1 - a) ** 0.5 * z, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_img2img_at_full_denoise_is_txt2img(sampler):
    eps_fn, ts = fake_eps_fn(), stage_c_preset()
    txt = our_loop(eps_fn, ts, generators_for_seeds([11]), 1, sampler=sampler)
    noise = NoiseSource(generators_for_seeds([11]))
    tail = truncate_for_denoise(ts, 1.0)
    x = noise_to(torch.randn(1, *SHAPE), tail[0].item(), noise((1, *SHAPE)))
    assert torch.equal(sample(eps_fn, x, tail, sampler, noise), txt)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_mask_keeps_region_exactly(sampler):
    eps_fn, ts = fake_eps_fn(), truncate_for_denoise(linear_timesteps(10), 0.6)
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 1, *SHAPE[1:])
    mask[..., :3, :] = 1.0
    noise = NoiseSource(generators_for_seeds([1, 2]))
    x = noise_to(x0, ts[0].item(), noise(x0.shape))
    out = sample(eps_fn, x, ts, sampler, noise, x0_source=x0, mask=mask)
    keep = mask.expand_as(x0) == 0
    assert torch.equal(out[keep], x0[keep])
    assert not torch.allclose(out[~keep], x0[~keep], atol=1e-2)


def test_callback_counts_and_interrupt():
    eps_fn, ts = fake_eps_fn(), linear_timesteps(6)
    seen = []
    out = our_loop(eps_fn, ts, generators_for_seeds([0]), 1,
                   callback=lambda i, n, x, x0: seen.append((i, n, x.clone(), x0.shape)))
    assert [(i, n) for i, n, _, _ in seen] == [(i, 6) for i in range(6)]
    assert torch.equal(seen[-1][2], out) and seen[0][3] == out.shape

    evals = []

    def counting(x, r):
        evals.append(r)
        return eps_fn(x, r)

    def stop(i, n, x, x0):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        our_loop(counting, ts, generators_for_seeds([0]), 1, callback=stop)
    assert len(evals) == 3


def test_callback_x0_estimate_and_unknown_sampler():
    x0 = torch.randn(1, *SHAPE)

    def eps_fn(x, r):
        a = alphas_cumprod(r).view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    estimates = []
    sample(eps_fn, torch.randn(1, *SHAPE), linear_timesteps(4), "ddpm", NoiseSource(generators_for_seeds([0])),
           callback=lambda i, n, x, est: estimates.append(est))
    assert all(torch.allclose(e, x0, atol=1e-3) for e in estimates)
    with pytest.raises(WuerstchenError):
        sample(eps_fn, x0, linear_timesteps(4), "euler")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("seeds", [[5], [5, 6, 7]], ids=["one generator", "one per image"])
def test_reserved_noise_equals_the_draws_one_by_one(seeds, dtype):
    shape = (len(seeds), 4, 8, 8)
    one_by_one = NoiseSource(generators_for_seeds(seeds), "cpu", dtype)
    expected = [one_by_one(shape) for _ in range(4)]
    reserved = NoiseSource(generators_for_seeds(seeds), "cpu", dtype)
    first = reserved(shape)  # the initial latent is drawn before the loop reserves its draws
    states = [g.get_state() for g in reserved.generators]
    reserved.reserve(3, shape)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(reserved.generators, states))  # drawn when asked
    got = [first] + [reserved(shape) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # each draw kept its own slot
    assert torch.equal(reserved(shape), one_by_one(shape))  # then one by one again, in sequence
    reserved.reserve(1, shape)
    with pytest.raises(RuntimeError, match="reserved"):
        reserved((1, 4, 8, 8) if len(seeds) > 1 else (2, 4, 8, 8))


@pytest.mark.parametrize("workers", [1, 3], ids=["one worker", "three workers"])
@pytest.mark.parametrize("seeds", [[5], [5, 6, 7, 8, 9]], ids=["one generator", "one per image"])
def test_background_draws_equal_the_draws_one_by_one(seeds, workers, monkeypatch):
    shape = (len(seeds), 4, 8, 8)
    inline = NoiseSource(generators_for_seeds(seeds), "cpu", torch.float16)
    expected = [inline(shape) for _ in range(5)]
    monkeypatch.setattr(os, "cpu_count", lambda: workers + 1)
    sampling._noise_workers.cache_clear()
    try:
        # two sources share the workers, as two stages or two queued prompts would; each keeps its order
        ahead, other = (NoiseSource(generators_for_seeds(seeds), "cpu", torch.float16, background=True)
                        for _ in range(2))
        assert len(sampling._noise_workers()) == workers
        got = [ahead(shape)]
        ahead.reserve(3, shape)
        other.reserve(4, shape)
        got += [ahead(shape) for _ in range(3)] + [ahead(shape)]  # the last one unreserved, after the rest
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(torch.equal(other(shape), e) for e in expected[:4])
        if len(seeds) > 1:  # found on the caller's thread, before anything is handed to a worker
            with pytest.raises(StageMismatchError, match="seeds for a batch"):
                ahead.reserve(2, (len(seeds) + 1, 4, 8, 8))
    finally:
        sampling._noise_workers.cache_clear()
