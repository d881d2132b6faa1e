"""Half-precision outputs of the three networks against their own float32 outputs, on the CPU.

Stated tolerances (max |low - fp32| / max |fp32| over the output): float16 ≤ 5e-3, bfloat16 ≤ 3e-2.
Measured on these tiny models: about 1e-3 (fp16) and 9e-3 (bf16), the same size as diffusers' own
fp16 error on the same weights. r stays float32 (as the samplers pass it for bf16); the effnet map
is float32 (resized in float32 inside the decoder).
"""

import copy

import pytest
import torch

from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a, b):
    return ((a.float() - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def build():
    # keep the output gates |1-b| (prior) and sigmoid(b) (decoder) O(1): a gate near 0 would divide
    # the rounding error by ~0 and measure the random weights, not the network's precision
    prior = tiny_prior(1)
    prior.out[1].bias[prior.cfg.c_in :] -= 4
    decoder = tiny_decoder(2)
    decoder.clf[1].bias[decoder.cfg.c_out * decoder.cfg.patch_size**2 :] += 4
    return prior, decoder, tiny_vqgan(3)


MODELS = build()
g = torch.Generator().manual_seed(0)
R = torch.tensor([0.3, 0.9])
PRIOR_IN = (torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 11, 48, generator=g))
DECODER_IN = (torch.randn(2, 4, 32, 48, generator=g), torch.randn(2, 8, 3, 4, generator=g) * 3,
              torch.randn(2, 13, 48, generator=g))
IMAGES = torch.rand(2, 3, 32, 24, generator=g)


def run(name, models, dtype):
    """One network entry point, with models (prior, decoder, vqgan) and inputs in `dtype`."""
    prior, decoder, vqgan = models
    x, clip = PRIOR_IN
    xb, effnet, clip_b = DECODER_IN
    if name == "prior":
        return prior(x.to(dtype), R, clip.to(dtype))
    if name.startswith("decoder"):
        return decoder(xb.to(dtype), R, effnet, clip_b.to(dtype))
    if name == "vqgan.encode":
        return vqgan.encode(IMAGES.to(dtype))
    return vqgan.decode(MODELS[2].encode(IMAGES).to(dtype))


@pytest.mark.parametrize("name", ["prior", "decoder", "decoder.folded", "vqgan.encode", "vqgan.decode"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@torch.no_grad()
def test_half_precision_stays_close_to_float32(dtype, name):
    expected = run(name, MODELS, torch.float32)
    low = [copy.deepcopy(m).to(dtype) for m in MODELS]
    if name == "decoder.folded":  # the sampling form, as load_decoder gives it: folded after the cast
        low[1].fold_effnet()
    try:
        got = run(name, low, dtype)
    except (RuntimeError, NotImplementedError) as e:
        if dtype == torch.float16 and "Half" in str(e):
            pytest.skip(f"this torch build has no CPU float16 kernel for an op of the {name} ({e})")
        raise
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) <= TOLERANCE[dtype]
