"""The converter: any supported input -> one compact .safetensors per component with metadata,
written atomically, loading back to the same weights (within the dtype)."""

import dataclasses
import json
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import wuerstchen_core.convert as convert_module
from tests.helpers.tiny_effnet import tiny_encoder
from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
from wuerstchen_core.convert import convert
from wuerstchen_core.errors import CheckpointError
from wuerstchen_core.loading import (
    identify_path,
    load_decoder,
    load_effnet,
    load_prior,
    load_text_encoder,
    load_vqgan,
    to_original_state_dict,
)
from tests.test_loading import needs_clip

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def models():
    return {"prior": tiny_prior(seed=1), "decoder": tiny_decoder(seed=2), "vqgan": tiny_vqgan(seed=3),
            "effnet": tiny_encoder(seed=4)}


def assert_loads_back(model, ref, dtype, stored=None):
    """model has ref's weights in `dtype`, after rounding to the file's `stored` dtype."""
    sd = model.state_dict()
    assert sd.keys() == ref.state_dict().keys() and model.cfg == ref.cfg
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v.to(stored or dtype).to(dtype) if v.is_floating_point() else v), k


def metadata(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def decoder_repo(path, models):
    for kind, cls in (("decoder", "WuerstchenDiffNeXt"), ("vqgan", "PaellaVQModel")):
        (path / kind).mkdir(parents=True)
        cfg = {"_class_name": cls, **dataclasses.asdict(models[kind].cfg)}
        (path / kind / "config.json").write_text(json.dumps(cfg))
        save_file(models[kind].state_dict(), path / kind / "diffusion_pytorch_model.safetensors")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenDecoderPipeline"}))
    return path


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_repo_folder_converts_to_one_file_per_component(tmp_path, models, dtype):
    out = tmp_path / "out"
    written = convert(decoder_repo(tmp_path / "wuerstchen", models), out, dtype=dtype)
    assert written == [out / f"wuerstchen_v2_decoder_{dtype}.safetensors", out / f"wuerstchen_v2_vqgan_{dtype}.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temp files left
    meta = metadata(written[1])
    assert meta["wuerstchen.component"] == "vqgan" and meta["wuerstchen.format_version"] == "1"
    assert json.loads(meta["wuerstchen.config"]) == dataclasses.asdict(models["vqgan"].cfg)
    as_stored = partial(load_decoder, fold_effnet=False)  # its sampling form reshapes weights
    assert_loads_back(as_stored(written[0], dtype=DTYPES[dtype]), models["decoder"], DTYPES[dtype])
    assert_loads_back(load_vqgan(written[1], dtype=DTYPES[dtype]), models["vqgan"], DTYPES[dtype])
    # a float32 load of an fp16 file gives the fp16-rounded weights
    assert_loads_back(as_stored(written[0]), models["decoder"], torch.float32, stored=DTYPES[dtype])


def test_original_stage_b_file_gives_decoder_and_effnet(tmp_path, models):
    path = tmp_path / "model_v2_stage_b.pt"
    torch.save({"state_dict": to_original_state_dict(models["decoder"].state_dict(), "decoder"),
                "effnet_state_dict": models["effnet"].state_dict(), "iter": 1}, path)
    written = convert(path, tmp_path / "out", dtype="fp32")
    assert [p.name for p in written] == ["wuerstchen_v2_decoder_fp32.safetensors", "wuerstchen_v2_effnet_fp32.safetensors"]
    assert_loads_back(load_decoder(written[0], fold_effnet=False), models["decoder"], torch.float32)
    assert_loads_back(load_effnet(written[1]), models["effnet"], torch.float32)
    with safe_open(written[0], framework="pt") as f:  # stored in diffusers layout
        assert not any("in_proj" in k for k in f.keys()) and any(".to_q." in k for k in f.keys())

    only = convert(path, tmp_path / "only", kinds=["effnet"], dtype="fp16")
    assert [p.name for p in only] == ["wuerstchen_v2_effnet_fp16.safetensors"]


def test_single_component_to_a_named_file(tmp_path, models):
    path = tmp_path / "model_v3_stage_c.pt"
    torch.save({"ema_state_dict": to_original_state_dict(models["prior"].state_dict(), "prior")}, path)
    [written] = convert(path, tmp_path / "my_prior.safetensors", dtype="bf16")
    assert written == tmp_path / "my_prior.safetensors"
    assert [i.kind for i in identify_path(written)] == ["prior"]
    assert_loads_back(load_prior(written, dtype=torch.bfloat16), models["prior"], torch.bfloat16)


def test_metadata_identifies_but_keys_are_still_validated(tmp_path, models):
    """A file whose metadata claims "prior" but holds decoder tensors is not silently loaded."""
    [written] = convert(decoder_repo(tmp_path / "repo", models), tmp_path / "x.safetensors", kinds=["decoder"])
    with safe_open(written, framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    prior_cfg = json.dumps(dataclasses.asdict(models["prior"].cfg))
    save_file(sd, tmp_path / "lying.safetensors", metadata={"wuerstchen.component": "prior", "wuerstchen.config": prior_cfg,
                                                           "wuerstchen.format_version": "1"})
    with pytest.raises(CheckpointError, match="does not match a Würstchen v2 Stage C prior.*missing keys.*unexpected keys"):
        load_prior(tmp_path / "lying.safetensors")


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, models):
    repo = decoder_repo(tmp_path / "repo", models)
    out = tmp_path / "out"
    out.mkdir()
    (out / "wuerstchen_v2_vqgan_fp16.safetensors").write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="wuerstchen_v2_vqgan_fp16.safetensors already exists; pass overwrite=True"):
        convert(repo, out)
    assert (out / "wuerstchen_v2_vqgan_fp16.safetensors").read_bytes() == b"keep me"
    assert not (out / "wuerstchen_v2_decoder_fp16.safetensors").exists()  # checked before writing anything
    written = convert(repo, out, overwrite=True)
    assert_loads_back(load_vqgan(written[1], dtype=torch.float16), models["vqgan"], torch.float16)


def test_a_failed_write_leaves_nothing_behind(tmp_path, models, monkeypatch):
    save_file(models["vqgan"].state_dict(), tmp_path / "vqgan.safetensors")

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "vqgan.safetensors", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_requests_are_explained(tmp_path, models):
    repo = decoder_repo(tmp_path / "repo", models)
    with pytest.raises(CheckpointError, match="holds 2 components .*give an output folder"):
        convert(repo, tmp_path / "both.safetensors")
    with pytest.raises(CheckpointError, match="holds a Würstchen v2 Stage B decoder, a Würstchen v2 Stage A VQGAN but no Würstchen v2 Stage C prior"):
        convert(repo, tmp_path / "out", kinds=["prior"])
    with pytest.raises(CheckpointError, match="dtype 'fp8'"):
        convert(repo, tmp_path / "out", dtype="fp8")


@needs_clip
def test_text_encoder_converts_with_text_model_layout(tmp_path):
    from tests.helpers.tiny_text import tiny_text_model

    model = tiny_text_model(seed=5)
    ref = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    repo = tmp_path / "repo"
    (repo / "text_encoder").mkdir(parents=True)
    model.config.to_json_file(repo / "text_encoder" / "config.json")
    save_file({"text_model." + k: v for k, v in ref.items()}, repo / "text_encoder" / "model.safetensors")
    (repo / "model_index.json").write_text("{}")
    [written] = convert(repo, tmp_path / "out", dtype="fp16")
    assert written.name == "wuerstchen_v2_text_custom_fp16.safetensors"  # tiny width: not bigG or H
    with safe_open(written, framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
        assert f.metadata()["wuerstchen.component"] == "text"
    enc = load_text_encoder(written, dtype=torch.float16)
    got = {k.removeprefix("text_model."): v for k, v in enc.model.state_dict().items()}
    assert all(torch.equal(got[k], v.half()) for k, v in ref.items())
