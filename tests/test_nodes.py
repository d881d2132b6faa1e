"""Every node's execute path without ComfyUI, with tiny random-weight models saved in a tmp models folder."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from nodes import ALL_NODES, conditioning, image, latents, loaders, sampling
from nodes.host import StandaloneHost, list_models, resolve_model
from nodes.spec import WIDGET_TYPES
from tests.helpers.tiny_pack import BIGG_WIDTH, FILES, H_WIDTH, write_tiny_models
from wuerstchen_core.errors import CheckpointError, SizeError, StageMismatchError, WuerstchenError

SIZE = 256  # smallest side: Stage C grid 6×6, Stage B grid 64×64


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def events():
    return []


@pytest.fixture
def host(models_dir, events):
    return StandaloneHost(str(models_dir), on_progress=lambda step, total, preview: events.append((step, total, preview)))


@pytest.fixture(scope="module")
def m(models_dir):
    """All components, loaded once through the loader nodes."""
    h = StandaloneHost(str(models_dir), on_progress=lambda *a: None)
    out = {kind: spec.execute(h, FILES[kind], "auto")[0] for kind, spec in
           (("prior", loaders.LOAD_PRIOR), ("decoder", loaders.LOAD_DECODER), ("vqgan", loaders.LOAD_VQGAN),
            ("effnet", loaders.LOAD_EFFNET))}
    out["bigG"] = loaders.LOAD_TEXT_ENCODER.execute(h, FILES["bigG"], "bigG (Stage C)", "auto")[0]
    out["H"] = loaders.LOAD_TEXT_ENCODER.execute(h, FILES["H"], "H (Stage B)", "fp32")[0]
    for tower in ("bigG", "H"):
        enc = conditioning.TEXT_ENCODE.execute
        out[f"pos_{tower}"], out[f"neg_{tower}"] = enc(h, out[tower], "a red cube")[0], enc(h, out[tower], "")[0]
    return out


def _empty(host, batch=1):
    return latents.EMPTY_LATENT.execute(host, SIZE, SIZE, batch).outputs[0]


def _stage_c(host, m, latent, seed=1, steps=2, **kw):
    args = dict(seed=seed, steps=steps, cfg=4.0, sampler="ddpm", denoise=1.0) | kw
    return sampling.STAGE_C_SAMPLER.execute(host, m["prior"], m["pos_bigG"], m["neg_bigG"], latent, **args)[0]


def _stage_b(host, m, stage_c, seed=1, steps=2, **kw):
    args = dict(seed=seed, steps=steps, cfg=0.0, sampler="ddpm", denoise=1.0) | kw
    return sampling.STAGE_B_SAMPLER.execute(host, m["decoder"], m["pos_H"], m["neg_H"], stage_c, **args)[0]


# ---------------------------------------------------------------------------------------------
# specs


def test_specs_are_well_formed():
    ids = [s.node_id for s in ALL_NODES]
    assert len(ids) == len(set(ids)) and all(i.startswith("Wuerstchen") for i in ids)
    assert len({s.category for s in ALL_NODES}) == 1
    for spec in ALL_NODES:
        assert spec.display_name and spec.description and spec.outputs
        for inp in spec.inputs:
            assert inp.tooltip, (spec.node_id, inp.name)
            if inp.type in WIDGET_TYPES and inp.type != "COMBO":
                assert inp.check(inp.default, None) is None, (spec.node_id, inp.name)
        optional = [i.optional for i in spec.inputs]
        assert optional == sorted(optional), f"{spec.node_id}: optional inputs must come last (ComfyUI's order)"


def test_only_comfy_host_imports_comfyui_and_nothing_imports_diffusers():
    pack = Path(__file__).resolve().parents[1]
    for path in [pack / "__init__.py", *sorted((pack / "nodes").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert "diffusers" not in names and "nodes" not in names, path  # the pack's nodes only relatively
        if path.name not in ("comfy_host.py", "__init__.py"):
            assert not names & {"comfy", "comfy_api", "folder_paths", "server"}, path


def test_pack_root_is_inert_without_comfyui_and_not_imported_by_pytest():
    root_init = Path(__file__).resolve().parents[1] / "__init__.py"
    assert not any(Path(getattr(mod, "__file__", None) or "/").resolve() == root_init for mod in list(sys.modules.values()))
    spec = importlib.util.spec_from_file_location("_wuerstchen_pack_root", root_init,
                                                  submodule_search_locations=[str(root_init.parent)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "comfy_entrypoint") and not hasattr(module, "NODE_CLASS_MAPPINGS")


# ---------------------------------------------------------------------------------------------
# model folders and loaders


def test_model_lists_merge_folders_and_skip_non_models(host, models_dir):
    prior_names = host.list_models("prior")
    assert FILES["prior"] in prior_names and "README.txt" not in prior_names
    assert "clip_g.safetensors" not in prior_names  # text_encoders is not a prior folder
    assert "clip_g.safetensors" in host.list_models("text_encoder")
    folder = models_dir / "wuerstchen" / "repo" / "prior"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    try:
        names = host.list_models("prior")
        assert "repo/prior" in names and "repo/prior/diffusion_pytorch_model.safetensors" not in names
    finally:
        for p in (folder / "config.json", folder / "diffusion_pytorch_model.safetensors"):
            p.unlink()
        folder.rmdir(), folder.parent.rmdir()
    assert list_models([str(models_dir / "missing")]) == []


@pytest.mark.parametrize("name", ["../secret.safetensors", "a/../../x.safetensors", "/etc/passwd",
                                  "..\\x.safetensors", "C:/x.safetensors", ""])
def test_model_names_leaving_the_folders_are_refused(host, models_dir, name):
    with pytest.raises(CheckpointError, match="outside the model folders"):
        loaders.LOAD_PRIOR.execute(host, name, "auto")


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="was not found"):
        resolve_model([str(tmp_path)], "nope.safetensors", "Stage C prior")


def test_loaders_give_the_core_error_for_a_wrong_file(host):
    with pytest.raises(CheckpointError, match="decoder"):
        loaders.LOAD_PRIOR.execute(host, FILES["decoder"], "auto")
    with pytest.raises(CheckpointError):
        loaders.LOAD_VQGAN.execute(host, FILES["bigG"], "auto")


def test_loader_outputs_and_dtypes(host, m):
    assert m["prior"].kind == "prior" and m["prior"].model.cfg.c_in == 16
    assert m["bigG"].tower == "bigG" and m["H"].tower == "H"
    assert m["prior"].dtype == torch.float32  # auto on CPU
    half = loaders.LOAD_VQGAN.execute(host, FILES["vqgan"], "bf16")[0]
    assert half.dtype == torch.bfloat16
    dtype_options = {spec.node_id: next(i.options for i in spec.inputs if i.name == "weight_dtype")
                     for spec in loaders.NODES}
    assert {name for name, options in dtype_options.items() if loaders.FP8 in options} == {
        loaders.LOAD_PRIOR.node_id, loaders.LOAD_DECODER.node_id}  # fp8 storage only for the Stage B/C Linears


@pytest.mark.parametrize("option", [loaders.FP8, loaders.FP8_FAST])
def test_fp8_loaders_store_linear_weights_in_float8_and_sample(host, m, option):
    fp8 = {kind: spec.execute(host, FILES[kind], option)[0]
           for kind, spec in (("prior", loaders.LOAD_PRIOR), ("decoder", loaders.LOAD_DECODER))}
    for loaded in fp8.values():
        assert loaded.dtype == torch.float32  # the compute dtype (auto: fp32 on CPU), not the storage dtype
        linears = [mod for mod in loaded.module.modules() if isinstance(mod, torch.nn.Linear)]
        assert linears and all(mod.weight.dtype == torch.float8_e4m3fn for mod in linears)
        assert all(mod.fp8_matmul is (option == loaders.FP8_FAST) for mod in linears)
    c = _stage_c(host, m | fp8, _empty(host))
    b = _stage_b(host, m | fp8, c)
    assert c["samples"].shape == (1, 16, 6, 6) and torch.isfinite(c["samples"]).all()
    assert b["samples"].shape[:2] == (1, 4) and torch.isfinite(b["samples"]).all()


# ---------------------------------------------------------------------------------------------
# conditioning and latents


def test_text_encode_gives_standard_conditioning(m):
    cond = m["pos_bigG"]
    assert isinstance(cond, list) and len(cond) == 1
    emb, extra = cond[0]
    assert emb.shape == (1, 77, BIGG_WIDTH) and extra == {"pooled_output": None, "wuerstchen_tower": "bigG"}
    assert m["pos_H"][0][0].shape == (1, 77, H_WIDTH) and m["pos_H"][0][1]["wuerstchen_tower"] == "H"
    assert not torch.equal(m["pos_bigG"][0][0], m["neg_bigG"][0][0])


def test_empty_latent_applies_the_128px_rule_and_says_so(host):
    res = latents.EMPTY_LATENT.execute(host, 1000, 1024, 3)
    lat = res.outputs[0]
    assert lat["samples"].shape == (3, 16, 24, 24) and lat["wuerstchen_stage"] == "C"
    assert "1000×1024" in res.text and "1024×1024" in res.text
    ok = latents.EMPTY_LATENT.execute(host, 1152, 1024, 1)
    assert ok.outputs[0]["samples"].shape == (1, 16, 24, 27) and "changed" not in ok.text
    with pytest.raises(SizeError):
        latents.EMPTY_LATENT.execute(host, 8192, 1024, 1)


def test_encoders(host, m):
    img = torch.rand(2, SIZE, SIZE, 3)
    c = latents.EFFNET_ENCODE.execute(host, m["effnet"], img).outputs[0]
    assert c["samples"].shape == (2, 16, 6, 6) and c["wuerstchen_stage"] == "C"
    res = latents.STAGE_A_ENCODE.execute(host, m["vqgan"], torch.rand(1, 250, 260, 3))
    b = res.outputs[0]
    assert b["samples"].shape == (1, 4, 64, 64) and b["wuerstchen_stage"] == "B" and "256×256" in res.text


# ---------------------------------------------------------------------------------------------
# samplers


def test_stage_c_sampler_progress_and_preview(host, m, events):
    out = _stage_c(host, m, _empty(host, 2), steps=3, cfg=1.0)
    assert out["samples"].shape == (2, 16, 6, 6) and out["wuerstchen_stage"] == "C"
    assert torch.isfinite(out["samples"]).all()
    assert [(s, t) for s, t, _ in events] == [(1, 3), (2, 3), (3, 3)]
    assert all(p is not None and p.size == (48, 48) and p.mode == "RGB" for _, _, p in events)


def test_seeds_schedule_and_guidance_reach_the_pipeline(host, m, monkeypatch):
    seen = []

    def fake(prior, cond, uncond, *, latent=None, seeds, **kw):
        seen.append(dict(kw, seeds=list(seeds), uncond=uncond is not None, latent=latent is not None))
        return torch.zeros(len(seeds), 16, 6, 6)

    monkeypatch.setattr(sampling.pipeline, "sample_stage_c", fake)
    _stage_c(host, m, _empty(host, 3), seed=7, steps=0)
    out = _stage_c(host, m, _empty(host, 2) | {"batch_index": [4, 1]}, seed=7, cfg=1.0)  # e.g. after latent batch nodes
    assert [d["seeds"] for d in seen] == [[7, 8, 9], [11, 8]] and out["batch_index"] == [4, 1]
    assert seen[0]["steps"] is None and seen[1]["steps"] == 2  # 0 = the Würstchen Stage C preset
    assert seen[0]["uncond"] and not seen[1]["uncond"]  # the negative is only used when cfg > 1
    assert not seen[0]["latent"] and (seen[0]["height"], seen[0]["width"]) == (SIZE, SIZE)  # txt2img from noise
    _stage_c(host, m, _empty(host), denoise=0.5)
    assert seen[-1]["latent"] and seen[-1]["denoise"] == 0.5


def test_batch_equals_single_runs(host, m):
    """Image 1 of a batch seeded 7 is the single image seeded 8 (up to batched-matmul rounding, which the
    tiny random prior's large outputs amplify)."""
    batch = _stage_c(host, m, _empty(host, 2), seed=7, steps=1, cfg=1.0)["samples"]
    single1 = _stage_c(host, m, _empty(host, 1), seed=8, steps=1, cfg=1.0)["samples"]
    other = _stage_c(host, m, _empty(host, 1), seed=9, steps=1, cfg=1.0)["samples"]
    scale = single1.abs().max()
    assert (batch[1:] - single1).abs().max() < 1e-2 * scale
    assert (other - single1).abs().max() > 1e-1 * scale


def test_stage_b_sampler_with_vqgan_preview(host, m, events):
    c = _stage_c(host, m, _empty(host), steps=1)
    events.clear()
    b = _stage_b(host, m, c, vqgan_for_preview=m["vqgan"])
    assert b["samples"].shape == (1, 4, 64, 64) and b["wuerstchen_stage"] == "B"
    assert [(s, t) for s, t, _ in events] == [(1, 2), (2, 2)]
    assert all(p is not None and p.size == (256, 256) for _, _, p in events)
    events.clear()
    _stage_b(host, m, c, steps=1)
    assert [p for _, _, p in events] == [None]  # no VQGAN: progress only


def test_stage_a_decode_tiled_and_untiled(host, m):
    b = {"samples": torch.randn(2, 4, 64, 64), "wuerstchen_stage": "B"}
    whole = image.STAGE_A_DECODE.execute(host, m["vqgan"], b, 0)[0]
    tiled = image.STAGE_A_DECODE.execute(host, m["vqgan"], b, 128)[0]
    assert whole.shape == tiled.shape == (2, SIZE, SIZE, 3)
    assert whole.min() >= 0 and whole.max() <= 1
    assert (whole - tiled).abs().mean() < 0.1  # same image up to the blended seams


def test_img2img_denoise_zero_keeps_the_latent(host, m):
    src = latents.EFFNET_ENCODE.execute(host, m["effnet"], torch.rand(1, SIZE, SIZE, 3)).outputs[0]
    out = _stage_c(host, m, src, denoise=0.0)
    torch.testing.assert_close(out["samples"], src["samples"])
    changed = _stage_c(host, m, src, denoise=0.5)
    assert not torch.allclose(changed["samples"], src["samples"])


@pytest.mark.parametrize("via", ["mask_input", "noise_mask"])
def test_stage_b_inpainting_keeps_unmasked_region(host, m, via):
    c = _stage_c(host, m, _empty(host))
    src = latents.STAGE_A_ENCODE.execute(host, m["vqgan"], torch.rand(1, SIZE, SIZE, 3)).outputs[0]
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1  # regenerate the left half
    if via == "mask_input":
        out = _stage_b(host, m, c, latent=src, mask=mask)
    else:
        out = _stage_b(host, m, c, latent=src | {"noise_mask": mask.reshape(1, 1, SIZE, SIZE)})
    torch.testing.assert_close(out["samples"][..., 40:], src["samples"][..., 40:])
    assert not torch.allclose(out["samples"][..., :24], src["samples"][..., :24])


def test_stage_c_inpainting_with_mask(host, m):
    src = latents.EFFNET_ENCODE.execute(host, m["effnet"], torch.rand(1, SIZE, SIZE, 3)).outputs[0]
    mask = torch.zeros(1, 6, 6)
    mask[:, :3] = 1
    out = _stage_c(host, m, src, mask=mask)
    torch.testing.assert_close(out["samples"][:, :, 3:], src["samples"][:, :, 3:])


def test_interrupt_from_progress_stops_sampling(models_dir, m):
    class Stop(Exception):
        pass

    def stop(step, total, preview):
        raise Stop

    with pytest.raises(Stop):
        _stage_c(StandaloneHost(str(models_dir), on_progress=stop), m, {"samples": torch.zeros(1, 16, 6, 6)})


# ---------------------------------------------------------------------------------------------
# mismatches: clear errors, never shape crashes


def test_stage_b_latent_to_stage_c_sampler(host, m):
    b = {"samples": torch.zeros(1, 4, 64, 64), "wuerstchen_stage": "B"}
    with pytest.raises(StageMismatchError, match=r"Stage C Sampler.*Stage B \(decoder\) latent.*expected a Stage C"):
        _stage_c(host, m, b)
    with pytest.raises(StageMismatchError, match="Stage B.*expected a Stage C"):
        _stage_c(host, m, {"samples": torch.zeros(1, 4, 64, 64)})  # key dropped: decided by channels


def test_stage_c_latent_to_stage_b_and_decode(host, m):
    c = _empty(host)
    with pytest.raises(StageMismatchError, match=r"input 'latent'.*Stage C \(prior\) latent.*expected a Stage B"):
        _stage_b(host, m, c, latent=c)
    with pytest.raises(StageMismatchError, match=r"input 'stage_c'.*Stage B"):
        _stage_b(host, m, {"samples": torch.zeros(1, 4, 64, 64), "wuerstchen_stage": "B"})
    with pytest.raises(StageMismatchError, match=r"Stage A Decode.*Stage C \(prior\) latent"):
        image.STAGE_A_DECODE.execute(host, m["vqgan"], c, 0)
    with pytest.raises(StageMismatchError, match=r"shape \[1, 7, 6, 6\]"):
        image.STAGE_A_DECODE.execute(host, m["vqgan"], {"samples": torch.zeros(1, 7, 6, 6)}, 0)


def test_wrong_tower_and_batch_in_conditioning(host, m):
    with pytest.raises(StageMismatchError, match="encoded with the H text encoder.*expected the bigG"):
        sampling.STAGE_C_SAMPLER.execute(host, m["prior"], m["pos_H"], m["neg_bigG"], _empty(host),
                                         1, 2, 4.0, "ddpm", 1.0)
    three = [[m["pos_bigG"][0][0].repeat(3, 1, 1), m["pos_bigG"][0][1]]]
    with pytest.raises(StageMismatchError, match="conditioning batch is 3 but the latent batch is 2"):
        sampling.STAGE_C_SAMPLER.execute(host, m["prior"], three, m["neg_bigG"], _empty(host, 2), 1, 2, 4.0, "ddpm", 1.0)
    foreign = [[torch.zeros(1, 77, BIGG_WIDTH), {"pooled_output": None}]]  # e.g. ComfyUI's CLIPTextEncode
    with pytest.raises(StageMismatchError, match="does not come from Würstchen Text Encode"):
        sampling.STAGE_C_SAMPLER.execute(host, m["prior"], foreign, m["neg_bigG"], _empty(host), 1, 2, 4.0, "ddpm", 1.0)


def test_stage_b_size_and_batch_mismatch(host, m):
    c = _stage_c(host, m, _empty(host, 2))
    with pytest.raises(StageMismatchError, match="latent batch is 3 but stage_c batch is 2"):
        _stage_b(host, m, c, latent={"samples": torch.zeros(3, 4, 64, 64), "wuerstchen_stage": "B"})
    with pytest.raises(StageMismatchError, match="latent is 96×64.*decodes to 256×256"):
        _stage_b(host, m, c, latent={"samples": torch.zeros(2, 4, 64, 96), "wuerstchen_stage": "B"})
    with pytest.raises(StageMismatchError, match="denoise 0.5 needs a Stage B latent"):
        _stage_b(host, m, c, denoise=0.5)


def test_errors_are_wuerstchen_errors():
    assert issubclass(StageMismatchError, WuerstchenError) and issubclass(CheckpointError, WuerstchenError)
