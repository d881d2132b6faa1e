"""Our Stage C / Stage B / Stage A networks against the diffusers reference implementation
(test-only oracle): identical state-dict keys and shapes, fp32 outputs within 1e-5 relative error,
config inference from weights and from diffusers config.json dicts."""

import copy
import dataclasses
import functools
import types

import pytest
import torch

from tests.helpers.tiny_models import randomize_, tiny_decoder_config, tiny_prior_config, tiny_vqgan_config
from wuerstchen_core.errors import CheckpointError, WrongComponentError
from wuerstchen_core.models.vqgan import MixingResidualBlock, ReplicationPad
from wuerstchen_core.models import (
    DecoderConfig,
    PaellaVQGAN,
    PriorConfig,
    VQGANConfig,
    WuerstchenDecoder,
    WuerstchenPrior,
    r_embedding,
)

ref = pytest.importorskip(
    "diffusers.pipelines.deprecated.wuerstchen", reason="diffusers (the test-only oracle) is not installed"
)
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel  # noqa: E402

TOL = 1e-5
BF16_TOL = 0.05

# config.json of the public checkpoints (reference doc §1.1, §2.1, §3.1)
PRIOR_JSON = {"_class_name": "WuerstchenPrior", "_diffusers_version": "0.21.0.dev0", "c": 1536, "c_cond": 1280,
              "c_in": 16, "c_r": 64, "depth": 32, "dropout": 0.1, "nhead": 24}
OLD_PRIOR_JSON = {"_class_name": "Prior", "c": 1536, "c_cond": 1280, "c_in": 16, "c_r": 64, "depth": 32,
                  "dropout": 0.1, "latent_size": [12, 12], "nhead": 24}
DECODER_JSON = {"_class_name": "WuerstchenDiffNeXt", "_diffusers_version": "0.21.0.dev0", "blocks": [4, 4, 14, 4],
                "c_cond": 1024, "c_hidden": [320, 640, 1280, 1280], "c_in": 4, "c_out": 4, "c_r": 64,
                "clip_embd": 1024, "dropout": [0.1, 0.1, 0.1, 0.1], "effnet_embd": 16,
                "inject_effnet": [False, True, True, True], "kernel_size": 3,
                "level_config": ["CT", "CTA", "CTA", "CTA"], "nhead": [-1, 10, 20, 20], "patch_size": 2}
VQGAN_JSON = {"_class_name": "PaellaVQModel", "_diffusers_version": "0.21.0.dev0", "bottleneck_blocks": 12,
              "embed_dim": 384, "in_channels": 3, "latent_channels": 4, "levels": 2, "num_vq_embeddings": 8192,
              "out_channels": 3, "scale_factor": 0.3764, "up_down_scale_factor": 2}
OLD_VQGAN_JSON = {"_class_name": "VQModelPaella", "bottleneck_blocks": 12, "c_hidden": 384, "c_latent": 4,
                  "codebook_size": 8192, "levels": 2, "scale_factor": 0.3764}
PUBLIC_PRIOR = PriorConfig(16, 1536, 1280, 64, 32, 24)

# a second decoder layout: effnet at level 0 only, attention only at level 0, 2 levels
DECODER_VARIANT = dict(c_hidden=(64, 128), nhead=(1, -1), blocks=(1, 2), level_config=("CTA", "CT"),
                       inject_effnet=(True, False))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_ours(cls, cfg, reference):
    """Build ours on the meta device and take the reference weights, strictly, both ways."""
    with torch.device("meta"):
        ours = cls(cfg)
    assert shapes(ours) == shapes(reference)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return ours.eval()


def build_ref(cls, seed, **kw):
    """The reference model with seeded random weights (built on meta: its own init is slow and unused)."""
    with torch.device("meta"):
        model = cls(**kw)
    return randomize_(model.to_empty(device="cpu"), seed).eval()


# Both output parametrisations divide by a gate computed from b (|1-b| for the prior, sigmoid(b)
# for the decoder). Random weights put some gates near 0, which amplifies float rounding far
# beyond the network's own error; shifting the b half of the output bias keeps the gates O(1).


@torch.no_grad()
def make_ref_prior(cfg):
    prior = build_ref(ref.WuerstchenPrior, 1, **dataclasses.asdict(cfg))
    prior.out[1].bias[cfg.c_in :] -= 4  # b ~ -4 -> |1-b| ~ 5
    return prior


@torch.no_grad()
def make_ref_decoder(cfg):
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    decoder = build_ref(ref.WuerstchenDiffNeXt, 2, **kw)
    decoder.clf[1].bias[cfg.c_out * cfg.patch_size**2 :] += 4  # b ~ 4 before PixelShuffle -> sigmoid(b) ~ 1
    return decoder


def make_ref_vqgan(cfg):
    return build_ref(PaellaVQModel, 3, **dataclasses.asdict(cfg))


PRIOR_CFG = tiny_prior_config()
DECODER_CFGS = [tiny_decoder_config(), tiny_decoder_config(**DECODER_VARIANT)]
VQGAN_CFGS = [tiny_vqgan_config(), tiny_vqgan_config(levels=3)]
ALL_CFGS = [PRIOR_CFG, *DECODER_CFGS, *VQGAN_CFGS]
BUILDERS = {PriorConfig: (WuerstchenPrior, make_ref_prior), DecoderConfig: (WuerstchenDecoder, make_ref_decoder),
            VQGANConfig: (PaellaVQGAN, make_ref_vqgan)}


@functools.cache
def pair(cfg):
    """(ours, reference) for a config, built once per test session."""
    cls, make_ref = BUILDERS[type(cfg)]
    reference = make_ref(cfg)
    return load_ours(cls, cfg, reference), reference


def cfg_id(cfg):
    return f"{type(cfg).__name__}-{ALL_CFGS.index(cfg)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c_r", [16, 17, 64])
def test_r_embedding_is_bitwise_reference(c_r, dtype):
    r = torch.cat([torch.tensor([0.0, 1.0, 0.999]), torch.rand(5, generator=torch.Generator().manual_seed(c_r))])
    r = r.to(dtype)
    expected = ref.WuerstchenPrior.gen_r_embedding(types.SimpleNamespace(c_r=c_r), r)
    got = r_embedding(r, c_r)
    assert got.dtype == dtype and got.shape == (8, c_r)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("batch,h,w", [(1, 5, 7), (3, 6, 4)])
@torch.no_grad()
def test_prior_forward_matches_reference(batch, h, w):
    ours, reference = pair(PRIOR_CFG)
    g = torch.Generator().manual_seed(batch * 100 + h)
    x = torch.randn(batch, 4, h, w, generator=g)
    r = torch.rand(batch, generator=g)
    clip = torch.randn(batch, 11, 48, generator=g)
    expected = reference(x, r, clip)
    got = ours(x, r, clip)
    assert got.shape == x.shape
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("batch,hw,effnet_hw", [(1, (32, 48), (3, 4)), (3, (48, 32), (5, 3))])
@pytest.mark.parametrize("cfg", DECODER_CFGS, ids=cfg_id)
@torch.no_grad()
def test_decoder_forward_matches_reference(cfg, batch, hw, effnet_hw):
    ours, reference = pair(cfg)
    g = torch.Generator().manual_seed(batch * 100 + hw[0])
    x = torch.randn(batch, 4, *hw, generator=g)
    r = torch.rand(batch, generator=g)
    effnet = torch.randn(batch, 8, *effnet_hw, generator=g) * 3
    clip = torch.randn(batch, 13, 48, generator=g)
    expected = reference(x, r, effnet, clip)
    got = ours(x, r, effnet, clip)
    assert got.shape == x.shape
    assert rel_err(got, expected) <= TOL
    # the sampling form (load_decoder's default): fewer weights, the same arithmetic up to rounding
    folded = copy.deepcopy(ours).fold_effnet()
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in ours.parameters())
    got_folded = folded(x, r, effnet, clip)
    assert rel_err(got_folded, expected) <= TOL
    assert torch.equal(folded.fold_effnet()(x, r, effnet, clip), got_folded)  # folding twice changes nothing


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_gradients_match_reference(kind):
    """With autograd on (fine-tuning scripts), the forward records a graph (no in-place shortcuts) and the
    input gradient equals the reference's."""
    ours, reference = pair(PRIOR_CFG if kind == "prior" else DECODER_CFGS[0])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, *((5, 6) if kind == "prior" else (32, 32)), generator=g)
    r = torch.rand(2, generator=g)
    clip = torch.randn(2, 11, 48, generator=g)
    cond = (clip,) if kind == "prior" else (torch.randn(2, 8, 3, 3, generator=g), clip)
    grads = []
    for net in (ours, reference):
        xg = x.clone().requires_grad_()
        net(xg, r, *cond).square().mean().backward()
        grads.append(xg.grad)
    assert rel_err(grads[0], grads[1]) <= TOL


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("p", [1, 2])
def test_replication_pad_equals_torch(p, fmt):
    """Stage A's copy-based padding: torch's ReplicationPad2d bit for bit, in the input's memory layout."""
    for shape in [(2, 5, 7, 9), (3, 4, 1, 6), (1, 2, 3, 1)]:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
            got = ReplicationPad(p)(x)
            assert torch.equal(got, torch.nn.ReplicationPad2d(p)(x))
            assert got.is_contiguous(memory_format=fmt) or shape[-1] == 1  # 1-wide: both layouts coincide


@pytest.mark.parametrize("banded", [False, True], ids=["whole", "banded"])
@pytest.mark.parametrize("batch,hw", [(1, (16, 24)), (3, (24, 8))])
@pytest.mark.parametrize("cfg", VQGAN_CFGS, ids=cfg_id)
@torch.no_grad()
def test_vqgan_matches_reference(cfg, batch, hw, banded, monkeypatch):
    """banded: the channelwise update runs over bands of 1-2 rows, as it does on large maps."""
    if banded:
        monkeypatch.setattr(MixingResidualBlock, "MAX_TOKENS", 20)
    ours, reference = pair(cfg)
    scale = ours.cfg.scale_factor
    img = torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(batch))
    latent = ours.encode(img)
    assert rel_err(latent, reference.encode(img).latents / scale) <= TOL
    expected = reference.decode(latent * scale, force_not_quantize=True).sample
    assert rel_err(ours.decode(latent), expected) <= TOL
    assert ours.decode(latent).shape == img.shape


@torch.no_grad()
def test_bf16_forward_with_fp32_timesteps_and_effnet():
    """Casting the r embedding (and the effnet map) to the model dtype happens inside forward."""
    prior = pair(PRIOR_CFG)[0]
    x, clip, r = torch.randn(2, 4, 5, 7), torch.randn(2, 11, 48), torch.tensor([0.3, 0.9])
    expected = prior(x, r, clip)
    got = copy.deepcopy(prior).bfloat16()(x.bfloat16(), r, clip.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), expected) <= BF16_TOL

    decoder = pair(DECODER_CFGS[0])[0]
    x, effnet, clip = torch.randn(2, 4, 16, 32), torch.randn(2, 8, 3, 4), torch.randn(2, 13, 48)
    expected = decoder(x, r, effnet, clip)
    got = copy.deepcopy(decoder).bfloat16()(x.bfloat16(), r, effnet, clip.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), expected) <= BF16_TOL


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=cfg_id)
def test_from_state_dict_round_trips(cfg):
    ours, reference = pair(cfg)
    assert type(cfg).from_state_dict(reference.state_dict()) == cfg


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=cfg_id)
def test_from_diffusers_reads_reference_configs(cfg):
    assert type(cfg).from_diffusers(dict(pair(cfg)[1].config)) == cfg


def test_from_diffusers_public_config_json():
    assert PriorConfig.from_diffusers(PRIOR_JSON) == PUBLIC_PRIOR
    assert PriorConfig.from_diffusers(OLD_PRIOR_JSON) == PUBLIC_PRIOR
    assert DecoderConfig.from_diffusers(DECODER_JSON) == DecoderConfig()
    assert VQGANConfig.from_diffusers(VQGAN_JSON) == VQGANConfig()
    assert VQGANConfig.from_diffusers(OLD_VQGAN_JSON) == VQGANConfig()
    # keys left out take the diffusers class defaults
    assert PriorConfig.from_diffusers({}) == PriorConfig(16, 1280, 1024, 64, 16, 16)


def test_wrong_component_and_bad_config_errors():
    prior_sd, decoder_sd = pair(PRIOR_CFG)[0].state_dict(), pair(DECODER_CFGS[0])[0].state_dict()
    with pytest.raises(WrongComponentError, match="prior"):
        PriorConfig.from_state_dict(decoder_sd)
    with pytest.raises(WrongComponentError, match="decoder"):
        DecoderConfig.from_state_dict(prior_sd)
    with pytest.raises(WrongComponentError, match="VQGAN"):
        VQGANConfig.from_state_dict(prior_sd)
    with pytest.raises(CheckpointError, match="nhead"):
        PriorConfig.from_diffusers({**PRIOR_JSON, "nhead": 25})
    with pytest.raises(CheckpointError, match="level_config"):
        DecoderConfig.from_diffusers({**DECODER_JSON, "level_config": ["TC", "CTA", "CTA", "CTA"]})
    with pytest.raises(CheckpointError, match="invalid value"):
        VQGANConfig.from_diffusers({**VQGAN_JSON, "levels": "two"})
