"""Stage functions of wuerstchen_core.pipeline beyond reference parity: tiled Stage A decoding, the
float16 overflow fallback, img2img / mask behaviour, batching and input errors."""

import warnings

import pytest
import torch

from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
from wuerstchen_core import pipeline
from wuerstchen_core.errors import SizeError, StageMismatchError, WuerstchenError

C_COND = 48  # tiny prior's text width


def _text(batch=1, width=C_COND, seed=0):
    return torch.randn(batch, 77, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vqgan():
    return tiny_vqgan()


@pytest.fixture(scope="module")
def prior():
    """Tiny prior with a small output head: a fully random one gives |eps| ~ 1e6 and chaotic sampling."""
    model = tiny_prior()
    with torch.no_grad():
        model.out[1].weight.mul_(0.1), model.out[1].bias.zero_()
    return model


def _overflowing(model_fn, layer, factor):
    """A model whose `layer` is scaled so that fp16 activations overflow (weights still fit in fp16)."""
    model = model_fn()
    with torch.no_grad():
        layer(model).weight.mul_(factor)
        layer(model).bias.mul_(factor)
    return model


# ---------------------------------------------------------------------------------------------
# Stage A


def test_tiled_decode_matches_untiled(vqgan):
    z = torch.randn(2, 4, 40, 72, generator=torch.Generator().manual_seed(0))
    full = pipeline.decode_stage_a(vqgan, z)
    assert full.shape == (2, 3, 160, 288) and full.dtype == torch.float32
    assert 0 <= full.min() and full.max() <= 1
    # overlap 12 > 4× the tiny VQGAN's receptive radius: seams vanish up to rounding
    tiled = pipeline.decode_stage_a(vqgan, z, tile=24, overlap=12)
    assert (tiled - full).abs().max().item() < 1e-5
    # the default overlap (tile // 4 = 4) is a visible-but-small approximation on this toy model
    assert (pipeline.decode_stage_a(vqgan, z, tile=16) - full).abs().mean().item() < 0.01
    # one tile covering everything is exactly the untiled decode
    assert torch.equal(pipeline.decode_stage_a(vqgan, z, tile=72), full)


def test_tile_starts_cover_with_overlap():
    for size, tile, overlap in [(512, 128, 32), (100, 24, 12), (24, 24, 6), (10, 24, 6)]:
        starts = pipeline._tile_starts(size, tile, overlap)
        assert starts[0] == 0 and min(starts[-1] + tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_decode_rejects_wrong_latents(vqgan):
    with pytest.raises(StageMismatchError, match="Stage A"):
        pipeline.decode_stage_a(vqgan, torch.zeros(1, 16, 8, 8))
    with pytest.raises(SizeError, match="overlap"):
        pipeline.decode_stage_a(vqgan, torch.zeros(1, 4, 8, 8), tile=16, overlap=16)


def test_encode_stage_a_round_trip_shapes(vqgan):
    images = torch.rand(1, 3, 64, 96)
    latent = pipeline.encode_stage_a(vqgan, images)
    assert latent.shape == (1, 4, 16, 24)
    assert pipeline.decode_stage_a(vqgan, latent).shape == images.shape
    with pytest.raises(SizeError, match="multiples of 4"):
        pipeline.encode_stage_a(vqgan, torch.rand(1, 3, 62, 96))


# ---------------------------------------------------------------------------------------------
# fp16 fallback


def test_fp16_overflow_in_decode_reruns_in_bf16_with_a_warning():
    def scaled():
        return _overflowing(tiny_vqgan, lambda m: m.out_block[0], 3e4)

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    reference = pipeline.decode_stage_a(scaled(), z)  # fp32: finite, values ~1e5 before the clamp
    model = scaled().half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="Stage A.*overflowed in float16.*bfloat16"):
        image = pipeline.decode_stage_a(model, z)
    assert torch.isfinite(image).all()
    assert (image == reference).float().mean() > 0.95  # saturated outputs agree with fp32
    # the model is float16 again with bit-identical weights
    assert all(t.dtype == before[k].dtype and torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_fp16_overflow_in_sampling_reruns_in_bf16(prior):
    model = _overflowing(tiny_prior, lambda m: m.projection, 1e4).half()
    with pytest.warns(RuntimeWarning, match="Stage C.*overflowed"):
        latent = pipeline.sample_stage_c(model, _text(), _text(seed=1), height=256, width=256, seeds=1, steps=2)
    assert latent.shape == (1, 4, 6, 6) and torch.isfinite(latent).all()
    assert next(model.parameters()).dtype == torch.float16


def test_non_finite_output_outside_fp16_raises(prior):
    model = tiny_prior()
    with torch.no_grad():
        model.out[1].bias.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback attempt, no warning: a clear error
        with pytest.raises(WuerstchenError, match="Stage C.*NaN/inf.*float32"):
            pipeline.sample_stage_c(model, _text(), height=256, width=256, seeds=0, steps=2, cfg=1.0)


# ---------------------------------------------------------------------------------------------
# Stage C / Stage B sampling behaviour


def test_stage_c_grid_snapping_and_preset(prior):
    with pytest.warns(UserWarning, match="300×250 changed to 256×256"):
        latent = pipeline.sample_stage_c(prior, _text(), height=250, width=300, seeds=5, steps=1, cfg=1.0)
    assert latent.shape == (1, 4, 6, 6)

    class Stop(Exception):
        pass

    def stop(i, n, x, x0):  # a callback may raise to interrupt; here after reading the step count
        raise Stop(n)

    with pytest.raises(Stop) as info:
        pipeline.sample_stage_c(prior, _text(), height=256, width=384, seeds=5, cfg=1.0, callback=stop)
    assert info.value.args == (29,)  # default schedule: the 29-step Stage C preset


def test_seeds_are_per_image(prior):
    kw = dict(height=256, width=384, steps=2, cfg=4.0)
    batch = pipeline.sample_stage_c(prior, _text(), _text(seed=1), seeds=10, batch_index=[0, 3], **kw)
    single = pipeline.sample_stage_c(prior, _text(), _text(seed=1), seeds=[13], **kw)
    torch.testing.assert_close(batch[1:], single, rtol=0, atol=1e-5 * single.abs().max().item())
    assert pipeline.image_seeds(10, 3) == [10, 11, 12]


def test_img2img_and_mask(prior):
    source = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    kw = dict(latent=source, seeds=1, steps=4, cfg=1.0)
    assert torch.equal(pipeline.sample_stage_c(prior, _text(), denoise=0.0, **kw), source)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 3:] = 1
    out = pipeline.sample_stage_c(prior, _text(), denoise=0.5, mask=mask, **kw)
    assert torch.equal(out[..., :3], source[..., :3])  # kept region is the source exactly
    assert not torch.allclose(out[..., 3:], source[..., 3:])
    with pytest.raises(StageMismatchError, match="mask without a latent"):
        pipeline.sample_stage_c(prior, _text(), height=256, width=256, mask=mask, seeds=0, cfg=1.0)


def test_stage_b_grid_and_conditioning_errors():
    decoder = tiny_decoder()
    c = torch.randn(1, decoder.cfg.effnet_embd, 3, 3)  # Stage C 3×3 -> Stage B int(3·10.67) = 32
    text = _text(width=decoder.cfg.clip_embd)
    latent = pipeline.sample_stage_b(decoder, c, text, seeds=[1, 2], steps=1)
    assert latent.shape == (2, 4, 32, 32)
    with pytest.raises(StageMismatchError, match="negative"):
        pipeline.sample_stage_b(decoder, c, text, seeds=0, steps=1, cfg=2.0)
    with pytest.raises(StageMismatchError, match="batch 3 for 2 images"):
        pipeline.sample_stage_b(decoder, c, _text(3, decoder.cfg.clip_embd), seeds=[1, 2], steps=1)
    with pytest.raises(SizeError, match="divisible by 16"):
        pipeline.sample_stage_b(decoder, torch.randn(1, decoder.cfg.effnet_embd, 4, 4), text, seeds=0, steps=1)
    assert torch.equal(pipeline.stage_c_to_effnet(torch.tensor([0.5])), torch.tensor([20.0]))


def test_stage_c_input_errors(prior):
    with pytest.raises(SizeError, match="height and width"):
        pipeline.sample_stage_c(prior, _text(), seeds=0)
    with pytest.raises(StageMismatchError, match="negative"):
        pipeline.sample_stage_c(prior, _text(), height=256, width=256, seeds=0, cfg=4.0)
    with pytest.raises(StageMismatchError, match="latent of shape"):
        pipeline.sample_stage_c(prior, _text(), latent=torch.zeros(1, 3, 6, 6), seeds=0, cfg=1.0)
