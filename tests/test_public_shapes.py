"""The networks built from the public configs have exactly the diffusers checkpoint keys, shapes
and parameter totals (built on the meta device: no memory, no weights needed). Loading real
weights into meta-built models (strict, assign=True) is exercised by test_models_parity.py."""

import json
import os
from pathlib import Path

import pytest
import torch

from wuerstchen_core.models import (
    DecoderConfig,
    PaellaVQGAN,
    PriorConfig,
    VQGANConfig,
    WuerstchenDecoder,
    WuerstchenPrior,
)

ROOT = Path(__file__).resolve().parents[1]
NAME = "wuerstchen_state_dict_shapes.json"


def shapes_json_path() -> Path:
    """$WUERSTCHEN_SHAPES_JSON, else ../shared/docs/ next to the repo, else the copy in tests/data."""
    env = os.environ.get("WUERSTCHEN_SHAPES_JSON")
    candidates = [env, ROOT.parent / "shared" / "docs" / NAME, ROOT / "tests" / "data" / NAME]
    return next(Path(p) for p in candidates if p and Path(p).is_file())


REFERENCE = json.loads(shapes_json_path().read_text())

PUBLIC = {
    "prior": (WuerstchenPrior, PriorConfig(16, 1536, 1280, 64, 32, 24)),
    "decoder": (WuerstchenDecoder, DecoderConfig()),
    "vqgan": (PaellaVQGAN, VQGANConfig()),
}


@pytest.fixture(scope="module", params=sorted(PUBLIC))
def public_model(request):
    cls, cfg = PUBLIC[request.param]
    with torch.device("meta"):
        return request.param, cls(cfg)


def test_keys_and_shapes_equal_reference(public_model):
    name, model = public_model
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = REFERENCE[name]
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected


def test_totals_equal_reference(public_model):
    name, model = public_model
    sd = model.state_dict()
    assert len(sd) == REFERENCE["totals"][name]["tensors"]
    assert sum(v.numel() for v in sd.values()) == REFERENCE["totals"][name]["elements"]


def test_config_inferred_from_public_shapes(public_model):
    name, model = public_model
    assert type(model.cfg).from_state_dict(model.state_dict()) == model.cfg

