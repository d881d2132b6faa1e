"""Checkpoint loading: every supported layout loads to the same weights, original keys convert
exactly, and every wrong / broken / unsafe file fails with one clear error."""

import dataclasses
import json
import os
import shutil
from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.tiny_effnet import tiny_encoder
from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
from wuerstchen_core import loading
from wuerstchen_core.errors import CheckpointError, UnsafeCheckpointError, WrongComponentError
from wuerstchen_core.loading import (
    build_model,
    convert_original_state_dict,
    identify,
    load_decoder,
    load_effnet,
    load_prior,
    load_text_encoder,
    load_vqgan,
    read_state_dict,
    resolve_component,
    to_original_state_dict,
)

# the decoder as stored (its sampling form, fold_effnet, reshapes weights: tests/test_models_parity.py)
LOADERS = {"prior": load_prior, "decoder": partial(load_decoder, fold_effnet=False), "vqgan": load_vqgan,
           "effnet": load_effnet}
CLASS_NAMES = {"prior": "WuerstchenPrior", "decoder": "WuerstchenDiffNeXt", "vqgan": "PaellaVQModel"}
PT_KEY = {"prior": "ema_state_dict", "decoder": "state_dict", "vqgan": "state_dict", "effnet": "effnet_state_dict"}


def _clip_importable() -> bool:
    try:
        import transformers

        return transformers.CLIPTextModel is not None
    except Exception:
        return False


needs_clip = pytest.mark.skipif(not _clip_importable(),
                                reason="transformers cannot import CLIPTextModel in this environment")


@pytest.fixture(scope="module")
def models():
    return {"prior": tiny_prior(seed=1), "decoder": tiny_decoder(seed=2), "vqgan": tiny_vqgan(seed=3),
            "effnet": tiny_encoder(seed=4)}


def assert_same_weights(model, ref_sd, dtype=None):
    sd = model.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k, v in ref_sd.items():
        want = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        assert sd[k].dtype == want.dtype, k
        assert torch.equal(sd[k], want), k


def write_component_folder(folder, model, kind, weights="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": CLASS_NAMES[kind], **dataclasses.asdict(model.cfg)}))
    sd = model.state_dict()
    if weights.endswith(".bin"):
        torch.save(sd, folder / weights)
    else:
        save_file(sd, folder / weights)
    return folder


def write(path, models, kind, fmt):
    """Save models[kind] at `path` in format `fmt`; returns the path to give the loader."""
    model = models[kind]
    sd = model.state_dict()
    if fmt == "safetensors":
        save_file(sd, path / f"{kind}.safetensors")
        return path / f"{kind}.safetensors"
    if fmt == "folder":
        return write_component_folder(path / kind, model, kind)
    if fmt == "folder_bin":
        return write_component_folder(path / kind, model, kind, "diffusion_pytorch_model.bin")
    if fmt == "sharded":
        folder = path / kind
        folder.mkdir()
        keys = list(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, folder / name)
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        return folder
    if fmt == "repo":
        repo = path / "repo"
        write_component_folder(repo / kind, model, kind)
        (repo / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenPriorPipeline"}))
        return repo
    assert fmt == "original"
    torch.save({PT_KEY[kind]: to_original_state_dict(sd, kind), "iter": 918000}, path / f"model_{kind}.pt")
    return path / f"model_{kind}.pt"


@pytest.mark.parametrize("kind,fmt", [
    *[(k, f) for k in ("prior", "decoder", "vqgan")
      for f in ("safetensors", "folder", "folder_bin", "sharded", "repo", "original")],
    ("effnet", "safetensors"), ("effnet", "original"),
])
def test_every_format_loads_the_same_weights(tmp_path, models, kind, fmt):
    before = torch.random.get_rng_state()
    model = LOADERS[kind](write(tmp_path, models, kind, fmt))
    assert torch.equal(torch.random.get_rng_state(), before)  # no random init ran
    assert type(model) is type(models[kind]) and model.cfg == models[kind].cfg
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_same_weights(model, models[kind].state_dict())


def test_loaded_model_runs_like_the_reference(tmp_path, models):
    model = load_prior(write(tmp_path, models, "prior", "original"))
    ref, cfg = models["prior"], models["prior"].cfg
    x, r, clip = torch.randn(1, cfg.c_in, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, cfg.c_cond)
    with torch.no_grad():
        assert torch.equal(model(x, r, clip), ref(x, r, clip))


@pytest.mark.parametrize("dtype", [torch.float16, "bf16", torch.float32])
def test_dtype_is_applied_while_reading(tmp_path, models, dtype):
    path = write(tmp_path, models, "vqgan", "original")
    model = load_vqgan(path, dtype=dtype)
    want = loading.as_dtype(dtype)
    assert_same_weights(model, models["vqgan"].state_dict(), want)
    assert model.state_dict()["down_blocks.3.1.num_batches_tracked"].dtype == torch.int64  # integers untouched
    sd, _ = read_state_dict(path, dtype)
    assert {v.dtype for v in sd.values()} == {want, torch.int64}


def test_build_model_takes_the_tensors_without_copying(models):
    sd = {k: v.clone() for k, v in models["prior"].state_dict().items()}
    model = build_model(type(models["prior"]), models["prior"].cfg, sd)
    assert all(model.state_dict()[k].data_ptr() == v.data_ptr() for k, v in sd.items())


# --- original key layout ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["prior", "decoder", "vqgan", "effnet"])
def test_original_conversion_round_trips_exactly(models, kind):
    sd = models[kind].state_dict()
    original = to_original_state_dict(sd, kind)
    if kind in ("prior", "decoder"):
        assert not any(".to_q." in k or ".to_out." in k for k in original)
        packed = [k for k in original if k.endswith("attention.attn.in_proj_weight")]
        assert packed and all(k.replace("attn.in_proj_weight", "attn.out_proj.weight") in original for k in packed)
        assert identify(original) == loading.Identity(kind, original=True)
    if kind == "vqgan":
        assert "vquantizer.codebook.weight" in original and "vquantizer.embedding.weight" not in original
        assert identify(original).original
    back = convert_original_state_dict(original, kind)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_in_proj_is_split_in_q_k_v_order():
    w, b = torch.arange(12.0).reshape(6, 2), torch.arange(6.0)
    sd = convert_original_state_dict({"blocks.2.attention.attn.in_proj_weight": w,
                                      "blocks.2.attention.attn.in_proj_bias": b,
                                      "blocks.2.attention.attn.out_proj.weight": w[:2]}, "prior")
    assert torch.equal(sd["blocks.2.attention.to_q.weight"], w[0:2])
    assert torch.equal(sd["blocks.2.attention.to_k.weight"], w[2:4])
    assert torch.equal(sd["blocks.2.attention.to_v.weight"], w[4:6])
    assert torch.equal(sd["blocks.2.attention.to_v.bias"], b[4:6])
    assert torch.equal(sd["blocks.2.attention.to_out.0.weight"], w[:2])


def test_original_pt_prefers_ema_and_strips_ddp_and_compile_prefixes(tmp_path, models):
    ema = to_original_state_dict(models["prior"].state_dict(), "prior")
    other = to_original_state_dict(tiny_prior(seed=9).state_dict(), "prior")
    torch.save({"state_dict": other, "ema_state_dict": {f"module._orig_mod.{k}": v for k, v in ema.items()}},
               tmp_path / "model_v3_stage_c.pt")
    assert_same_weights(load_prior(tmp_path / "model_v3_stage_c.pt"), models["prior"].state_dict())


def test_stage_b_pt_holds_decoder_and_effnet(tmp_path, models):
    path = tmp_path / "model_v2_stage_b.pt"
    torch.save({"state_dict": to_original_state_dict(models["decoder"].state_dict(), "decoder"),
                "effnet_state_dict": models["effnet"].state_dict()}, path)
    assert_same_weights(load_decoder(path, fold_effnet=False), models["decoder"].state_dict())
    assert_same_weights(load_effnet(path), models["effnet"].state_dict())
    with pytest.raises(WrongComponentError, match="is a Würstchen v2 Stage B decoder, but the Stage A VQGAN loader"):
        load_vqgan(path)
    assert [i.kind for i in loading.identify_path(path)] == ["decoder", "effnet"]


# --- resolving folders -------------------------------------------------------------------------

def test_repo_folder_resolves_subfolders_and_explains_missing_ones(tmp_path, models):
    repo = tmp_path / "wuerstchen-prior"
    write_component_folder(repo / "prior", models["prior"], "prior")
    (repo / "text_encoder").mkdir()
    (repo / "model_index.json").write_text("{}")
    src = resolve_component(repo, "prior")
    assert src.files == (repo / "prior" / "diffusion_pytorch_model.safetensors",)
    assert src.config["c"] == models["prior"].cfg.c
    with pytest.raises(WrongComponentError, match=r"no decoder/ .*warp-ai/wuerstchen \(decoder/\)"):
        load_decoder(repo)
    with pytest.raises(WrongComponentError, match="model_v2_stage_b.pt"):
        load_effnet(repo)


def test_text_repo_resolves_encoder_and_tokenizer(tmp_path):
    repo = tmp_path / "repo"
    (repo / "text_encoder").mkdir(parents=True)
    (repo / "text_encoder" / "config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, repo / "text_encoder" / "model.safetensors")
    shutil.copytree(loading.Path(loading.__file__).parent / "data" / "clip-bpe", repo / "tokenizer")
    (repo / "model_index.json").write_text("{}")
    src = resolve_component(repo, "text")
    assert src.files == (repo / "text_encoder" / "model.safetensors",) and src.tokenizer == repo / "tokenizer"
    assert resolve_component(repo / "text_encoder" / "model.safetensors", "text").tokenizer is None


def test_config_json_that_disagrees_with_the_weights_lists_the_shapes(tmp_path, models):
    folder = write_component_folder(tmp_path / "prior", models["prior"], "prior")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "c_cond": 64}))
    with pytest.raises(CheckpointError, match=r"1 wrong shapes.*cond_mapper\.0\.weight \[128, 48\] vs \[128, 64\]"):
        load_prior(folder)


# --- wrong files -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,loader,expected", [
    ("decoder", "prior", r"decoder\.safetensors is a Würstchen v2 Stage B decoder, but the Stage C prior loader was "
                         r"used; load it with the Stage B decoder loader \(models/wuerstchen\)\."),
    ("prior", "decoder", "is a Würstchen v2 Stage C prior, but the Stage B decoder loader"),
    ("vqgan", "effnet", "is a Würstchen v2 Stage A VQGAN, but the EfficientNet encoder loader"),
    ("effnet", "vqgan", "is a Würstchen v2 EfficientNet encoder, but the Stage A VQGAN loader"),
])
def test_wrong_component_names_what_the_file_is(tmp_path, models, kind, loader, expected):
    save_file(models[kind].state_dict(), tmp_path / f"{kind}.safetensors")
    with pytest.raises(WrongComponentError, match=expected):
        LOADERS[loader](tmp_path / f"{kind}.safetensors")


def _t(*shape):
    return torch.zeros(shape)


STABLE_CASCADE_C = {"clip_txt_mapper.weight": _t(8, 4), "clip_txt_pooled_mapper.weight": _t(32, 4),
                    "clip_img_mapper.weight": _t(32, 6), "embedding.1.weight": _t(8, 16, 1, 1),
                    "down_blocks.0.0.channelwise.0.weight": _t(32, 8), "clf.1.weight": _t(16, 8, 1, 1)}
STABLE_CASCADE_B = {"effnet_mapper.0.weight": _t(8, 16, 1, 1), "pixels_mapper.0.weight": _t(8, 3, 1, 1),
                    "clip_mapper.weight": _t(32, 4), "embedding.1.weight": _t(8, 16, 1, 1),
                    "clf.1.weight": _t(16, 8, 1, 1)}
STABLE_CASCADE_EFFNET = {"backbone.0.0.weight": _t(4, 3, 3, 3), "mapper.0.weight": _t(16, 8, 1, 1),
                         "mapper.1.running_mean": _t(16), "mapper.1.running_var": _t(16)}


@pytest.mark.parametrize("sd,loader,kind", [
    (STABLE_CASCADE_C, load_prior, "stable_cascade_c"),
    (STABLE_CASCADE_B, load_decoder, "stable_cascade_b"),
    (STABLE_CASCADE_EFFNET, load_effnet, "stable_cascade_effnet"),
])
def test_stable_cascade_files_point_to_comfyui_nodes(tmp_path, sd, loader, kind):
    save_file(sd, tmp_path / "stage_x.safetensors")
    assert identify(sd).kind == kind
    with pytest.raises(WrongComponentError) as e:
        loader(tmp_path / "stage_x.safetensors")
    msg = str(e.value)
    assert msg.startswith("stage_x.safetensors is") and "Stable Cascade (Würstchen v3)" in msg
    assert "ComfyUI's built-in Stable Cascade nodes" in msg and "\n" not in msg


@pytest.mark.parametrize("sd,kind,advice", [
    ({"model.diffusion_model.input_blocks.0.0.weight": _t(1), "first_stage_model.encoder.conv_in.weight": _t(1)},
     "sd_checkpoint", "checkpoint loader"),
    ({"conv_in.weight": _t(1), "time_embedding.linear_1.weight": _t(1), "down_blocks.0.resnets.0.conv1.weight": _t(1)},
     "sd_unet", "UNet loader"),
    ({"encoder.conv_in.weight": _t(1), "decoder.conv_in.weight": _t(1), "quant_conv.weight": _t(1)}, "vae", "VAE loader"),
    ({"lora_unet_down_blocks_0.lora_down.weight": _t(1), "lora_unet_down_blocks_0.alpha": _t(1)}, "lora", "LoRA"),
    ({"foo.weight": _t(1), "bar.bias": _t(1)}, "unknown", "not a file this pack recognises"),
])
def test_foreign_files_are_recognised(tmp_path, sd, kind, advice):
    assert identify(sd).kind == kind
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(WrongComponentError, match=advice):
        load_prior(tmp_path / "other.safetensors")


def test_text_towers_are_identified_by_width():
    def clip(width, prefix="text_model."):
        return {f"{prefix}embeddings.token_embedding.weight": torch.empty(10, width, device="meta"),
                f"{prefix}encoder.layers.0.mlp.fc1.weight": torch.empty(4, width, device="meta")}
    assert identify(clip(1280)) == loading.Identity("text", tower="bigG")
    assert identify(clip(1024, "")) == loading.Identity("text", tower="H")
    assert identify(clip(128)) == loading.Identity("text")
    openclip = {"conditioner.embedders.1.model.token_embedding.weight": torch.empty(10, 1280, device="meta"),
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.empty(1)}
    assert identify(openclip).tower == "bigG"


def test_missing_and_unexpected_keys_are_listed(tmp_path, models):
    sd = dict(models["prior"].state_dict())
    dropped = [k for k in sd if k.endswith(("to_k.bias", "to_v.bias", "kv_mapper.1.bias"))]
    assert len(dropped) == 6
    for k in dropped:
        del sd[k]
    sd["extra.weight"], sd["blocks.0.extra"] = _t(2), _t(2)
    save_file(sd, tmp_path / "prior.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_prior(tmp_path / "prior.safetensors")
    msg = str(e.value)
    assert msg.startswith("prior.safetensors does not match a Würstchen v2 Stage C prior")
    assert "6 missing keys (" in msg and "(6 in all)" in msg and sum(k in msg for k in dropped) == 5
    assert "2 unexpected keys (" in msg and "extra.weight" in msg and "blocks.0.extra" in msg


# --- broken and unsafe files -------------------------------------------------------------------

def _one_line_error(exc_type, fn, *args):
    with pytest.raises(exc_type) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_broken_files_give_one_clear_line(tmp_path, models):
    save_file(models["prior"].state_dict(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "head.safetensors").write_bytes(data[:6])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    torch.save(models["vqgan"].state_dict(), tmp_path / "whole.pt")
    pt = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(pt[: len(pt) // 2])
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "README.md").write_text("hi")
    (tmp_path / "notes.txt").write_text("hi")

    assert "cut.safetensors is not a readable safetensors file" in _one_line_error(CheckpointError, load_prior, tmp_path / "cut.safetensors")
    assert "truncated or corrupt" in _one_line_error(CheckpointError, load_prior, tmp_path / "head.safetensors")
    assert "empty.safetensors is empty (0 bytes)" in _one_line_error(CheckpointError, load_prior, tmp_path / "empty.safetensors")
    assert "noise.pt is not a readable PyTorch checkpoint" in _one_line_error(CheckpointError, load_prior, tmp_path / "noise.pt")
    assert "cut.pt is not a readable PyTorch checkpoint" in _one_line_error(CheckpointError, load_vqgan, tmp_path / "cut.pt")
    assert "no_weights is a folder without weights" in _one_line_error(CheckpointError, load_prior, tmp_path / "no_weights")
    assert "missing.safetensors does not exist" in _one_line_error(CheckpointError, load_prior, tmp_path / "missing.safetensors")
    assert "notes.txt is not a weights file" in _one_line_error(CheckpointError, load_prior, tmp_path / "notes.txt")


class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for a checkpoint that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name,zip_format", [("model_v2_stage_c.pt", True), ("legacy.ckpt", False),
                                             ("prior/diffusion_pytorch_model.bin", True)])
def test_code_running_pickle_is_refused(tmp_path, models, name, zip_format):
    marker = tmp_path / "payload_ran"
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    torch.save({"ema_state_dict": to_original_state_dict(models["prior"].state_dict(), "prior"),
                "hook": _Payload(marker)}, path, _use_new_zipfile_serialization=zip_format)
    assert b"mkdir" in path.read_bytes()  # the payload really is in the file
    msg = _one_line_error(UnsafeCheckpointError, load_prior, path if path.suffix != ".bin" else path.parent)
    assert path.name in msg and "safetensors" in msg
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path)
    assert not marker.exists()


def test_legacy_non_zip_pickle_loads_without_mmap(tmp_path, models):
    sd = models["vqgan"].state_dict()
    torch.save({"state_dict": sd}, tmp_path / "vqgan.pt", _use_new_zipfile_serialization=False)
    assert_same_weights(load_vqgan(tmp_path / "vqgan.pt"), sd)


# --- text --------------------------------------------------------------------------------------

@needs_clip
def test_text_encoder_from_repo_and_single_files(tmp_path):
    from tests.helpers.tiny_text import tiny_text_model

    model = tiny_text_model(seed=3)
    ref = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    repo = tmp_path / "repo"
    (repo / "text_encoder").mkdir(parents=True)
    model.config.to_json_file(repo / "text_encoder" / "config.json")
    save_file({"text_model." + k: v for k, v in ref.items()}, repo / "text_encoder" / "model.safetensors")
    shutil.copytree(loading.Path(loading.__file__).parent / "data" / "clip-bpe", repo / "tokenizer")
    (repo / "model_index.json").write_text("{}")
    save_file({"text_model." + k: v for k, v in ref.items()}, tmp_path / "clip.safetensors")
    torch.save({"text_model." + k: v for k, v in ref.items()}, tmp_path / "clip.bin")
    for path in (repo, tmp_path / "clip.safetensors", tmp_path / "clip.bin"):
        enc = load_text_encoder(path, dtype=torch.float16)
        got = {k.removeprefix("text_model."): v for k, v in enc.model.state_dict().items()}
        assert all(torch.equal(got[k], v.half()) for k, v in ref.items() if not k.endswith("position_ids"))
        assert enc.encode(["a cat"]).shape == (1, 77, 128)


@needs_clip
def test_23_layer_clip_h_is_rejected_for_the_decoder_slot(tmp_path):
    width = 1024
    sd = {"text_model.embeddings.token_embedding.weight": _t(10, width),
          "text_model.embeddings.position_embedding.weight": _t(77, width),
          **{f"text_model.encoder.layers.{i}.mlp.fc1.weight": _t(4, width) for i in range(23)}}
    save_file(sd, tmp_path / "sd2_clip_h.safetensors")
    msg = _one_line_error(WrongComponentError, load_text_encoder, tmp_path / "sd2_clip_h.safetensors", "H")
    assert "sd2_clip_h.safetensors" in msg and "23-layer" in msg


def test_text_loader_refuses_a_prior(tmp_path, models):
    save_file(models["prior"].state_dict(), tmp_path / "prior.safetensors")
    with pytest.raises(WrongComponentError, match=r"Stage C prior, but the text encoder loader .*models/wuerstchen"):
        load_text_encoder(tmp_path / "prior.safetensors")


def test_damaged_key_names_stay_on_one_line(tmp_path):
    """Found by the byte-flip fuzzer: a flipped byte turned a key into 'in_block.1.wei\\nht'."""
    path = tmp_path / "flipped.pt"
    torch.save({"in_block.1.wei\nht": torch.zeros(2), "down_blocks.0.gammas": torch.zeros(6)}, path)
    with pytest.raises(WrongComponentError) as e:
        loading.load_vqgan(str(path))
    assert "\n" not in str(e.value) and "in_block.1.wei\\nht" in str(e.value)
