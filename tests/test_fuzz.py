"""Issue 4, fuzzing: the original <-> diffusers key conversion round-trips on random key sets, and garbage
files and mutated workflows always end in a WuerstchenError (never another exception type, never a
hang); the CLI prints one `error:` line for them, no traceback."""

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from tests.helpers.tiny_models import tiny_prior, tiny_vqgan
from tests.helpers.tiny_pack import FILES, write_tiny_models
from tests.test_robustness import one_thread, tiny_workflow  # noqa: F401 (autouse fixture)
from wuerstchen_core import loading
from wuerstchen_core.errors import CheckpointError, WorkflowError
from wuerstchen_core.convert import convert
from wuerstchen_core.loading import convert_original_state_dict, load_prior, to_original_state_dict

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# key conversion: original (packed in_proj, codebook) <-> diffusers, exactly, on random layouts

names = st.text("abcdefghij_", min_size=1, max_size=6)
paths = st.lists(st.one_of(names, st.integers(0, 40).map(str)), min_size=1, max_size=4).map(".".join)


@st.composite
def diffusers_state_dicts(draw, kind):
    """A random diffusers-layout state dict: attention blocks under random paths (q/k/v/out of random
    widths, with or without biases) plus random other keys, which must pass through untouched."""
    sd, gen = {}, torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    for prefix in draw(st.lists(paths, max_size=4, unique=True)):
        c, c_in = draw(st.integers(1, 6)), draw(st.integers(1, 6))  # packing needs equal q/k/v shapes
        for n in "qkv":
            sd[f"{prefix}.attention.to_{n}.weight"] = torch.randn(c, c_in, generator=gen)
        sd[f"{prefix}.attention.to_out.0.weight"] = torch.randn(c, c, generator=gen)
        if draw(st.booleans()):
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                sd[f"{prefix}.attention.{n}.bias"] = torch.randn(c, generator=gen)
    for key in draw(st.lists(paths.map(lambda p: p + ".weight"), max_size=6)):
        shape = draw(st.lists(st.integers(0, 3), max_size=4))
        sd.setdefault(key, torch.randn(shape, generator=gen))
    if kind == "vqgan" and draw(st.booleans()):
        sd["vquantizer.embedding.weight"] = torch.randn(draw(st.integers(1, 9)), 4, generator=gen)
    return sd


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["prior", "decoder", "vqgan", "effnet"]), st.data())
def test_key_conversion_round_trips_both_ways(kind, data):
    sd = data.draw(diffusers_state_dicts(kind))
    original = to_original_state_dict(sd, kind)
    if kind in loading.ATTENTION_KINDS:
        assert not any(".to_q." in k or ".to_out.0." in k for k in original)
        for k in (k for k in sd if k.endswith("to_q.weight")):  # packed [q; k; v] along dim 0
            packed = original[k.replace("to_q.weight", "attn.in_proj_weight")]
            assert torch.equal(packed, torch.cat([sd[k.replace("to_q", f"to_{n}")] for n in "qkv"]))
    else:
        assert original.keys() == sd.keys() - {"vquantizer.embedding.weight"} | (
            {"vquantizer.codebook.weight"} if "vquantizer.embedding.weight" in sd else set())
    assert same(convert_original_state_dict(original, kind), sd)
    assert same(to_original_state_dict(convert_original_state_dict(original, kind), kind), original)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(paths, st.integers(1, 5), st.booleans()), max_size=4, unique_by=lambda t: t[0]),
       st.integers(0, 2**31))
def test_original_layout_splits_and_packs_back_exactly(blocks, seed):
    gen, sd = torch.Generator().manual_seed(seed), {}
    for prefix, c, bias in blocks:
        sd[f"{prefix}.attn.in_proj_weight"] = torch.randn(3 * c, c, generator=gen)
        sd[f"{prefix}.attn.out_proj.weight"] = torch.randn(c, c, generator=gen)
        if bias:
            sd[f"{prefix}.attn.in_proj_bias"] = torch.randn(3 * c, generator=gen)
            sd[f"{prefix}.attn.out_proj.bias"] = torch.randn(c, generator=gen)
    converted = convert_original_state_dict(sd, "decoder")
    assert len(converted) == sum(4 + 4 * bias for _, _, bias in blocks)
    assert same(to_original_state_dict(converted, "decoder"), sd)


# ---------------------------------------------------------------------------------------------
# garbage files: always a CheckpointError, for the loaders and for identification (convert)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    save_file(tiny_prior().state_dict(), folder / "prior.safetensors")
    torch.save({"state_dict": to_original_state_dict(tiny_vqgan().state_dict(), "vqgan")}, folder / "vqgan.pt")
    return {"safetensors": (folder / "prior.safetensors").read_bytes(), "pt": (folder / "vqgan.pt").read_bytes()}


def must_fail_cleanly(path: Path, loader=load_prior):
    """Loading and converting `path` raise a one-line CheckpointError (a WuerstchenError), nothing else,
    and write nothing."""
    out = path.parent / "converted"
    for fn, args in ((loader, (path,)), (convert, (path, out))):
        try:
            fn(*args)
        except CheckpointError as e:
            assert "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"{fn.__name__} accepted {path.name}")
    assert not out.exists()


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([".safetensors", ".pt", ".bin", ".ckpt", ".sft"]))
def test_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(data)
    must_fail_cleanly(path)


@FUZZ
@given(st.data(), st.sampled_from(["safetensors", "pt"]))
def test_random_truncations(tmp_path, valid_files, data, fmt):
    blob = valid_files[fmt]
    cut = data.draw(st.integers(0, len(blob) - 1))
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(blob[:cut])
    must_fail_cleanly(path, load_prior if fmt == "safetensors" else loading.load_vqgan)


@FUZZ
@given(st.data())
def test_random_byte_flips_in_a_zip_checkpoint(tmp_path, valid_files, data):
    """Damaged zip checkpoints either still load (the flip hit tensor data) or raise CheckpointError."""
    blob = bytearray(valid_files["pt"])
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(blob))
    try:
        loading.load_vqgan(path)
    except CheckpointError as e:
        assert "\n" not in str(e)


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16",
          "U32", "U64", "C64", "F4", "XYZ"]


@st.composite
def safetensors_headers(draw):
    """A syntactically plausible safetensors file with a random header: odd dtypes, shapes, offsets."""
    header = {}
    for name in draw(st.lists(st.text(min_size=0, max_size=8), max_size=4, unique=True)):
        header[name] = {"dtype": draw(st.sampled_from(DTYPES)),
                        "shape": draw(st.lists(st.integers(-2, 2**40).filter(lambda n: n < 9 or n > 2**20), max_size=3)),
                        "data_offsets": draw(st.lists(st.integers(-1, 64), min_size=0, max_size=3))}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers()),
                                                      max_size=2))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) + draw(st.integers(-2, 2))) + raw + draw(st.binary(max_size=64))


@FUZZ
@given(safetensors_headers())
def test_random_safetensors_headers(tmp_path, blob):
    path = tmp_path / "header.safetensors"
    path.write_bytes(blob)
    must_fail_cleanly(path)


@FUZZ
@given(st.dictionaries(paths.map(lambda p: p + ".weight"), st.lists(st.integers(0, 3), max_size=3), min_size=1,
                       max_size=6))
def test_valid_safetensors_with_random_keys(tmp_path, shapes):
    path = tmp_path / "random_keys.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path)
    must_fail_cleanly(path)


@pytest.fixture(scope="module")
def prior_sd():
    return tiny_prior().state_dict()


@FUZZ
@given(st.data())
def test_real_keys_dropped_added_or_reshaped(tmp_path, prior_sd, data):
    """Any damage to a real prior's key set is listed (never a partial load); no damage loads."""
    sd = dict(prior_sd)
    keys = sorted(sd)
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        del sd[k]
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
        if k in sd:
            sd[k] = torch.zeros([n + 1 for n in sd[k].shape] or [2])
    for k in data.draw(st.lists(paths.map(lambda p: "blocks." + p), max_size=2)):
        sd.setdefault(k, torch.zeros(1))
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(save(sd))
    if sd.keys() == prior_sd.keys() and all(sd[k].shape == prior_sd[k].shape for k in sd):
        load_prior(path)
        return
    with pytest.raises(CheckpointError) as e:
        load_prior(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# workflows: random mutations of a valid API workflow always validate or raise WorkflowError


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from nodes.host import StandaloneHost

    models = write_tiny_models(tmp_path_factory.mktemp("models"))
    return StandaloneHost(str(models), input_dir=str(models), output_dir=str(models / "out"), on_progress=lambda *a: None)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                                     st.sampled_from(list(FILES.values()) + ["../x", "", "1", "9"])),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
links = st.tuples(st.sampled_from([str(i) for i in range(0, 15)] + ["x"]), st.integers(-1, 3)).map(list)


@st.composite
def mutated_workflows(draw):
    wf = tiny_workflow()
    for _ in range(draw(st.integers(1, 4))):
        nid = draw(st.sampled_from(sorted(wf) or ["1"]))
        node = wf.get(nid)
        op = draw(st.sampled_from(["value", "link", "drop_input", "drop_node", "class", "node", "inputs", "add"]))
        if op in ("value", "link", "drop_input") and isinstance(node, dict) and isinstance(node.get("inputs"), dict) \
                and node["inputs"]:
            name = draw(st.sampled_from(sorted(node["inputs"])))
            if op == "drop_input":
                del node["inputs"][name]
            else:
                node["inputs"][name] = draw(json_values if op == "value" else links)
        elif op == "drop_node":
            wf.pop(nid, None)
        elif op == "class" and isinstance(node, dict):
            node["class_type"] = draw(st.one_of(st.sampled_from([n["class_type"] for n in tiny_workflow().values()]),
                                                json_values))
        elif op == "node":
            wf[nid] = draw(json_values)
        elif op == "inputs" and isinstance(node, dict):
            node["inputs"] = draw(json_values)
        elif op == "add":
            wf[draw(st.text(max_size=3))] = copy.deepcopy(draw(st.sampled_from(list(tiny_workflow().values()))))
    return wf


@settings(FUZZ, report_multiple_bugs=False)
@given(mutated_workflows())
def test_mutated_workflows_validate_or_raise_workflow_error(host, wf):
    from nodes.runner import validate_workflow

    try:
        order = validate_workflow(wf, host)
    except WorkflowError as e:
        assert "\n" not in str(e), str(e)
        return
    assert set(order) <= set(wf)


@settings(FUZZ, report_multiple_bugs=False)
@given(st.data())
def test_mutated_ui_workflow_files_load_or_raise_workflow_error(tmp_path, data):
    """The CLI `run` path for UI-format files: JSON -> ui_to_api, on damaged UI graphs."""
    from nodes.runner import SPECS, load_workflow
    from nodes.workflow_format import api_to_ui

    ui = api_to_ui(tiny_workflow(), SPECS, "fuzz")
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(["node", "links", "widgets", "input_link", "id"]))
        node = data.draw(st.sampled_from(ui["nodes"]))
        if target == "node":
            node[data.draw(st.sampled_from(["type", "mode", "inputs", "widgets_values"]))] = data.draw(json_values)
        elif target == "links" and ui["links"]:
            ui["links"][data.draw(st.integers(0, len(ui["links"]) - 1))] = data.draw(json_values)
        # a field an earlier round replaced by any JSON value is only mutated further while still a list
        elif target == "widgets" and isinstance(node["widgets_values"], list) and node["widgets_values"]:
            node["widgets_values"][data.draw(st.integers(0, len(node["widgets_values"]) - 1))] = data.draw(json_values)
        elif target == "input_link" and isinstance(node["inputs"], list) and node["inputs"] \
                and isinstance(node["inputs"][0], dict):
            node["inputs"][0]["link"] = data.draw(json_values)
        elif target == "id":
            node["id"] = data.draw(json_values)
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(ui))
    try:
        load_workflow(path)
    except WorkflowError as e:
        assert "\n" not in str(e), str(e)


# ---------------------------------------------------------------------------------------------
# the CLI on garbage: one `error:` line per file, exit 2, no traceback (one subprocess for all)


def test_cli_reports_garbage_without_a_traceback(tmp_path, valid_files):
    files = {"noise.safetensors": os.urandom(300), "cut.safetensors": valid_files["safetensors"][:100],
             "cut.pt": valid_files["pt"][:500], "empty.pt": b"", "text.ckpt": b"hello"}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad_workflow.json").write_text('{"1": {"class_type": "Nope", "inputs": {}}}')
    (tmp_path / "broken.json").write_text("{nope")
    calls = [["convert", name, "out"] for name in files] + [
        ["convert", "folder", "out"],
        ["generate", "--prior", "cut.safetensors", "--decoder", "folder", "--prompt", "x", "--device", "cpu"],
        ["run", "bad_workflow.json", "--models-dir", "folder"], ["run", "broken.json"]]
    script = ("import json, sys\nfrom wuerstchen_core.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    print('rc', main(argv), file=sys.stderr, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(calls)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in lines if line.startswith("rc")] == ["rc 2"] * len(calls), proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(calls) and len(lines) == 2 * len(calls), proc.stderr
    for name in files:
        assert any(name in e for e in errors), (name, errors)
    assert not (tmp_path / "out").exists()
