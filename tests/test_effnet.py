import math

import pytest
import torch
from torch import nn

from tests.helpers.tiny_effnet import TINY_EFFNET, randomize_effnet_, tiny_encoder
from wuerstchen_core.errors import CheckpointError, StageMismatchError, WrongComponentError
from wuerstchen_core.models.effnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EffNetConfig,
    EfficientNetEncoder,
    effnet_input_size,
    encode_stage_c,
    preprocess_for_effnet,
)

TV_REASON = "torchvision (test-only oracle) is not installed in tests/.oracle; see the test command in README.md"


@pytest.fixture(scope="module")
def torchvision():
    """The oracle; tests/conftest.py makes its CPU-incompatible wheel importable (see there)."""
    return pytest.importorskip("torchvision", reason=TV_REASON)


def meta_state(cfg):
    with torch.device("meta"):
        return EfficientNetEncoder(cfg).state_dict()


def shapes(sd, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in sd.items()}


# --- structure --------------------------------------------------------------------------------------------


def test_public_structure_without_torchvision():
    """Numbers torchvision documents: efficientnet_v2_s has 21,458,488 parameters, of which the classifier
    Linear(1280, 1000) holds 1,281,000; features end in 1280 channels."""
    with torch.device("meta"):
        m = EfficientNetEncoder(EffNetConfig.public())
    assert sum(p.numel() for p in m.backbone.parameters()) == 21_458_488 - 1_281_000
    sd = shapes(m.state_dict())
    assert len(sd) == 786  # 780 features entries + mapper conv + 5 BN entries
    assert sd["backbone.0.0.weight"] == (24, 3, 3, 3)
    assert sd["backbone.6.0.block.2.fc1.weight"] == (40, 960, 1, 1)  # SE squeeze = block input // 4
    assert sd["backbone.6.14.block.2.fc1.weight"] == (64, 1536, 1, 1)
    assert sd["backbone.7.0.weight"] == (1280, 256, 1, 1)
    assert sd["mapper.0.weight"] == (16, 1280, 1, 1) and sd["mapper.1.running_var"] == (16,)
    assert m.backbone[1][0].block[0][1].eps == 1e-3 and m.mapper[1].eps == 1e-5


def test_public_keys_match_torchvision(torchvision):
    with torch.device("meta"):
        ref = torchvision.models.efficientnet_v2_s(weights=None).features.state_dict()
    ours = meta_state(EffNetConfig.public())
    assert shapes({k: v for k, v in ours.items() if k.startswith("backbone.")}) == shapes(ref, "backbone.")
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(ours) - {f"backbone.{k}" for k in ref} == {"mapper.0.weight", *(f"mapper.1.{n}" for n in bn)}


@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_forward_matches_torchvision(torchvision, hw):
    torch.manual_seed(0)
    ref = nn.Module()
    ref.backbone = torchvision.models.efficientnet_v2_s(weights=None).features
    ref.mapper = nn.Sequential(nn.Conv2d(1280, 16, 1, bias=False), nn.BatchNorm2d(16))
    randomize_effnet_(ref, seed=1)
    ours = EfficientNetEncoder(EffNetConfig.public()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.mapper(ref.backbone(x))
        got = ours(x)
    assert got.shape == (2, 16, math.ceil(hw[0] / 32), math.ceil(hw[1] / 32))
    assert (want[0] - want[1]).abs().max() > 0.1 * want.abs().max()  # the output depends on the input
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


# --- config inference -------------------------------------------------------------------------------------


def test_from_state_dict_public_and_tiny():
    assert EffNetConfig.from_state_dict(meta_state(EffNetConfig.public())) == EffNetConfig()
    assert EffNetConfig.from_state_dict(meta_state(TINY_EFFNET)) == TINY_EFFNET
    enc = tiny_encoder()
    rebuilt = EfficientNetEncoder(EffNetConfig.from_state_dict(enc.state_dict()))
    rebuilt.load_state_dict(enc.state_dict(), strict=True)


def test_from_state_dict_v2_m_layout(torchvision):
    """7-stage layouts (EfficientNetV2-M/L, the v1 encoder) are inferred too and load strictly."""
    with torch.device("meta"):
        ref = {f"backbone.{k}": v for k, v in torchvision.models.efficientnet_v2_m().features.state_dict().items()}
    ref.update({k: v for k, v in meta_state(EffNetConfig.public()).items() if k.startswith("mapper.")})
    cfg = EffNetConfig.from_state_dict(ref)
    assert len(cfg.stages) == 7 and cfg.stages[-1].c_out == 512 and cfg.stages[-1].stride == 1
    assert shapes(meta_state(cfg)) == shapes(ref)


def test_from_state_dict_errors():
    sd = meta_state(TINY_EFFNET)
    with pytest.raises(WrongComponentError, match="mapper.0.weight"):
        EffNetConfig.from_state_dict({k: v for k, v in sd.items() if not k.startswith("mapper.")})
    with pytest.raises(WrongComponentError, match="backbone.0.0.weight"):
        EffNetConfig.from_state_dict({"mapper.0.weight": sd["mapper.0.weight"]})
    five_stages = {k.replace("backbone.7.", "backbone.6."): v for k, v in sd.items() if not k.startswith("backbone.6.")}
    with pytest.raises(CheckpointError, match="5 backbone stages"):
        EffNetConfig.from_state_dict(five_stages)


# --- preprocessing and the Stage C latent -----------------------------------------------------------------


def test_preprocess_normalises_and_centre_crops():
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    img = torch.rand(2, 3, 32, 48)
    assert torch.allclose(preprocess_for_effnet(img[..., :32], 32, 32), (img[..., :32] - mean) / std)
    # a 64×128 image whose middle half is white: covering 32×32 halves it to 32×64, the centre crop is white
    wide = torch.zeros(1, 3, 64, 128)
    wide[..., 32:96] = 1
    out = preprocess_for_effnet(wide, 32, 32) * std + mean
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[..., 1:-1], torch.ones(()), atol=1e-5)
    # a tall image is upscaled to cover a wide target
    assert preprocess_for_effnet(torch.rand(1, 3, 40, 20), 24, 48).shape == (1, 3, 24, 48)
    with pytest.raises(StageMismatchError, match=r"\[batch, 3, height, width\]"):
        preprocess_for_effnet(torch.rand(1, 4, 32, 32), 32, 32)


@pytest.mark.parametrize("width,height", [(512, 512), (768, 768), (1024, 1024), (1152, 1152), (1536, 1536),
                                          (1024, 1536), (1000, 1000)])
def test_input_size_gives_the_stage_c_grid(width, height):
    grid = (math.ceil(height / 42.67), math.ceil(width / 42.67))
    h, w = effnet_input_size(width, height)
    assert (math.ceil(h / 32), math.ceil(w / 32)) == grid and h % 32 == 0 and w % 32 == 0
    if width % 128 == 0 and height % 128 == 0:
        assert (h, w) == (height * 3 // 4, width * 3 // 4)  # the 0.75× rule


@pytest.mark.parametrize("width,height", [(512, 512), (768, 768), (1024, 1024), (1152, 1152), (1536, 1536),
                                          (1024, 1536)])
def test_encode_stage_c_grid_and_transform(width, height):
    enc = tiny_encoder()
    images = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    latent = encode_stage_c(enc, images, width, height)
    assert latent.shape == (1, TINY_EFFNET.c_latent, math.ceil(height / 42.67), math.ceil(width / 42.67))
    if (width, height) == (512, 512):
        with torch.no_grad():
            raw = enc(preprocess_for_effnet(images, 384, 384))
        assert latent.dtype == torch.float32
        torch.testing.assert_close(latent, (raw + 1) / 42)
        torch.testing.assert_close(latent * 42 - 1, raw)
