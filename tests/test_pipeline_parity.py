"""Text -> image through our pipeline equals the reference diffusers pipelines (test-only oracle) for
the same weights, tokenizer and seeds: WuerstchenPriorPipeline then WuerstchenDecoderPipeline, fp32,
ddpm, with the Stage C preset and linear steps, with and without guidance in each stage."""

import dataclasses

import pytest
import torch

from tests.helpers.tiny_models import randomize_, tiny_decoder_config, tiny_prior_config, tiny_vqgan_config
from tests.helpers.tiny_text import tiny_text_model
from wuerstchen_core import pipeline
from wuerstchen_core.models import PaellaVQGAN, WuerstchenDecoder, WuerstchenPrior
from wuerstchen_core.schedule import stage_c_preset
from wuerstchen_core.text import TextEncoder, load_tokenizer

ref = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen", reason="diffusers (the test-only oracle) is not installed")
from diffusers import DDPMWuerstchenScheduler  # noqa: E402
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel  # noqa: E402

PROMPT, NEGATIVE = "a red car on a bridge", "blurry"
HEIGHT, WIDTH = 256, 384  # Stage C 6×9, Stage B 64×96
SEED_C, SEED_B = 7, 9


def _lists(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _ours(cls, cfg, reference):
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    # text width 128 (the tiny CLIP towers); the prior's latent channels = the decoder's effnet width
    pc = tiny_prior_config(c_cond=128)
    dc = tiny_decoder_config(clip_embd=128, effnet_embd=pc.c_in, blocks=(1, 1, 2, 1))
    vc = tiny_vqgan_config()
    rp = randomize_(ref.WuerstchenPrior(**dataclasses.asdict(pc)), 1).eval()
    rd = randomize_(ref.WuerstchenDiffNeXt(**_lists(dc)), 2).eval()
    rv = randomize_(PaellaVQModel(**dataclasses.asdict(vc)), 3).eval()
    with torch.no_grad():
        # Tame the output heads: fully random ones give |eps| ~ 1e6 (prior: 1/|1-b| with b ≈ 1), where
        # fp32 rounding alone exceeds any tolerance. Small heads keep latents O(10) and images mid-range.
        rp.out[1].weight.mul_(0.1), rp.out[1].bias.zero_()
        clf = rd.clf[1]
        clf.weight.mul_(0.1), clf.bias.zero_(), clf.bias[clf.bias.shape[0] // 2:].fill_(4.0)
    tokenizer = load_tokenizer()
    text_c, text_b = tiny_text_model(4), tiny_text_model(5)
    ref_prior = ref.WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_c, prior=rp,
                                            scheduler=DDPMWuerstchenScheduler())
    ref_decoder = ref.WuerstchenDecoderPipeline(tokenizer=tokenizer, text_encoder=text_b, decoder=rd, vqgan=rv,
                                                scheduler=DDPMWuerstchenScheduler())
    for p in (ref_prior, ref_decoder):
        p.set_progress_bar_config(disable=True)
    ours = dict(prior=_ours(WuerstchenPrior, pc, rp), decoder=_ours(WuerstchenDecoder, dc, rd),
                vqgan=_ours(PaellaVQGAN, vc, rv), prior_text=TextEncoder(text_c, tokenizer),
                decoder_text=TextEncoder(text_b, tokenizer))
    return ref_prior, ref_decoder, ours


@pytest.mark.parametrize("prior_steps, prior_cfg, decoder_cfg", [
    (None, 4.0, 0.0),  # the Würstchen defaults: Stage C preset (29 steps), prior guidance only
    (None, 1.0, 2.0),
    (3, 4.0, 2.0),
    (3, 1.0, 0.0),
])
def test_text_to_image_matches_reference(models, prior_steps, prior_cfg, decoder_cfg):
    ref_prior, ref_decoder, ours = models
    schedule = {"num_inference_steps": prior_steps} if prior_steps else {"timesteps": stage_c_preset().tolist()}
    embeddings = ref_prior(PROMPT, height=HEIGHT, width=WIDTH, guidance_scale=prior_cfg, negative_prompt=NEGATIVE,
                           generator=torch.Generator().manual_seed(SEED_C), output_type="pt", **schedule).image_embeddings
    expected = ref_decoder(image_embeddings=embeddings, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3,
                           guidance_scale=decoder_cfg, generator=torch.Generator().manual_seed(SEED_B),
                           output_type="pt").images
    assert embeddings.shape == (1, 4, 6, 9) and expected.shape == (1, 3, HEIGHT, WIDTH)

    image = pipeline.generate(**ours, prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, seed=SEED_C,
                              decoder_seed=SEED_B, prior_steps=prior_steps, prior_cfg=prior_cfg, decoder_steps=3,
                              decoder_cfg=decoder_cfg)
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert (image - expected).abs().max().item() <= 1 / 255
    # not a vacuous comparison of saturated images
    assert ((expected > 0.02) & (expected < 0.98)).float().mean() > 0.2


def test_stage_functions_match_reference_latents(models):
    """Stage by stage: the Stage C latent ×42−1 is diffusers' image_embeddings, and Stage B alone (given
    those embeddings) matches the decoder pipeline's latent output with guidance on."""
    ref_prior, ref_decoder, ours = models
    embeddings = ref_prior(PROMPT, height=HEIGHT, width=WIDTH, guidance_scale=4.0, num_inference_steps=2,
                           generator=torch.Generator().manual_seed(3), output_type="pt").image_embeddings
    text_c = ours["prior_text"]
    stage_c = pipeline.sample_stage_c(ours["prior"], text_c.encode([PROMPT]), text_c.encode([""]), height=HEIGHT,
                                      width=WIDTH, seeds=[3], steps=2, cfg=4.0)
    scale = embeddings.abs().max().item()  # embeddings are latents ×42: compare relative to their size
    torch.testing.assert_close(pipeline.stage_c_to_effnet(stage_c), embeddings, rtol=0, atol=1e-5 * scale)

    expected = ref_decoder(image_embeddings=embeddings, prompt=PROMPT, num_inference_steps=2, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(5), output_type="latent").images
    text_b = ours["decoder_text"]
    latent = pipeline.sample_stage_b(ours["decoder"], (embeddings + 1) / 42, text_b.encode([PROMPT]),
                                     text_b.encode([""]), seeds=[5], steps=2, cfg=3.0)
    assert latent.shape == (1, 4, 64, 96)
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_batch_equals_single_runs(models):
    """Image i of a batch uses seed + i in each stage, and one prompt embedding is paired with every image.
    Not bit-exact: fp32 kernels round differently for batch 2 and 1 (~1e-7 per forward), so ≤ 1e-4."""
    _, _, ours = models
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, prior_steps=2, prior_cfg=4.0,
              decoder_steps=2, decoder_cfg=2.0)
    batch = pipeline.generate(**ours, **kw, batch=2, seed=11, decoder_seed=20)
    singles = [pipeline.generate(**ours, **kw, seed=11 + i, decoder_seed=20 + i) for i in range(2)]
    assert batch.shape == (2, 3, HEIGHT, WIDTH)
    for i in range(2):
        assert (batch[i] - singles[i][0]).abs().max().item() <= 1e-4
    assert (batch[0] - batch[1]).abs().max().item() > 0.05  # different seeds, different images
