"""The workflow runner's validation: every bad workflow gets a WorkflowError naming the node id and field."""

import copy
import json

import pytest

from nodes.host import StandaloneHost
from nodes.runner import CORE_NODES, SPECS, load_workflow, run_workflow, run_workflow_file, validate_workflow
from nodes.workflow_format import api_to_ui, ui_to_api
from tests.helpers.tiny_pack import FILES, text_to_image_workflow, write_test_image, write_tiny_models
from wuerstchen_core.errors import CheckpointError, WorkflowError


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def host(models_dir, tmp_path):
    return StandaloneHost(str(models_dir), input_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                          on_progress=lambda *a: None)


def small_workflow():
    """Text -> Stage C -> Stage B -> Stage A -> SaveImage at 256 px (300 wide, snapped) with 1+1 steps,
    plus an unconnected second empty latent."""
    wf = text_to_image_workflow(width=300, prior_steps=1, decoder_steps=1, prior_sampler="ddim")
    wf["13"] = {"class_type": "WuerstchenEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}}
    return wf


def test_runs_end_to_end_and_skips_nodes_no_output_needs(host, tmp_path):
    res = run_workflow(small_workflow(), host)
    assert "13" not in res["outputs"]  # not connected to an output node
    assert res["outputs"]["11"][0].shape == (1, 256, 256, 3)
    assert res["ui"]["12"]["images"][0]["filename"] == "t_00001_.png"
    assert (tmp_path / "out" / "t_00001_.png").is_file()
    assert "300×256 changed to 256×256" in res["ui"]["8"]["text"][0]


def test_execution_order_is_topological(host):
    order = validate_workflow(small_workflow(), host)
    assert set(order) == set(small_workflow()) - {"13"}
    position = {nid: i for i, nid in enumerate(order)}
    for nid, node in small_workflow().items():
        for value in node["inputs"].values():
            if isinstance(value, list) and nid in position:
                assert position[value[0]] < position[nid]


def _broken(change):
    wf = small_workflow()
    change(wf)
    return wf


BAD = [
    ("unknown class", lambda wf: wf["9"].update(class_type="KSampler"), r"Node 9: unknown class_type 'KSampler'"),
    ("missing input", lambda wf: wf["9"]["inputs"].pop("seed"), r"Node 9 \(WuerstchenStageCSampler\), input 'seed': required"),
    ("missing link", lambda wf: wf["10"]["inputs"].pop("stage_c"), r"Node 10 .*input 'stage_c': required"),
    ("unknown node", lambda wf: wf["9"]["inputs"].update(latent=["99", 0]), r"Node 9 .*input 'latent': linked to node 99, which is not"),
    ("bad index", lambda wf: wf["9"]["inputs"].update(latent=["8", 1]), r"Node 9 .*input 'latent': linked to output 1 of node 8 .*1 output"),
    ("type mismatch", lambda wf: wf["9"]["inputs"].update(latent=["6", 0]),
     r"Node 9 .*input 'latent': linked to a CONDITIONING output of node 6 .*expected LATENT"),
    ("custom type mismatch", lambda wf: wf["10"]["inputs"].update(decoder=["1", 0]),
     r"Node 10 .*input 'decoder': linked to a WUERSTCHEN_PRIOR output .*expected WUERSTCHEN_DECODER"),
    ("value for a socket", lambda wf: wf["9"]["inputs"].update(prior="x"), r"Node 9 .*input 'prior': got the value 'x', expected a link"),
    ("widget type", lambda wf: wf["9"]["inputs"].update(steps="12"), r"Node 9 .*input 'steps': expected a number, got str"),
    ("not integral", lambda wf: wf["9"]["inputs"].update(steps=1.5), r"Node 9 .*input 'steps': expected a whole number"),
    ("bool as int", lambda wf: wf["9"]["inputs"].update(seed=True), r"Node 9 .*input 'seed': expected a number"),
    ("below min", lambda wf: wf["10"]["inputs"].update(steps=0), r"Node 10 .*input 'steps': 0 is below the minimum 1"),
    ("above max", lambda wf: wf["9"]["inputs"].update(denoise=1.5), r"Node 9 .*input 'denoise': 1.5 is above the maximum 1.0"),
    ("not in list", lambda wf: wf["9"]["inputs"].update(sampler="euler"), r"Node 9 .*input 'sampler': 'euler' is not in the list"),
    ("string type", lambda wf: wf["6"]["inputs"].update(text=5), r"Node 6 .*input 'text': expected text"),
    ("model not listed", lambda wf: wf["1"]["inputs"].update(model_name="other.safetensors"),
     r"Node 1 .*input 'model_name': 'other.safetensors' is not in the list"),
    ("path traversal", lambda wf: wf["1"]["inputs"].update(model_name="../wuerstchen/" + FILES["prior"]),
     r"Node 1 .*input 'model_name': '\.\./wuerstchen/.*' is not in the list"),
    ("cycle", lambda wf: wf["9"]["inputs"].update(latent=["10", 0]), r"links form a cycle"),
    ("no output", lambda wf: wf.pop("12"), r"no output node"),
    ("not a node", lambda wf: wf.update({"14": 5}), r"Node 14: expected an object"),
]


@pytest.mark.parametrize("change,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_workflows_name_node_and_field(host, change, message):
    with pytest.raises(WorkflowError, match=message):
        run_workflow(_broken(change), host)


def test_nothing_runs_before_validation_passes(host, tmp_path):
    wf = _broken(lambda wf: wf["12"]["inputs"].update(filename_prefix=3))
    with pytest.raises(WorkflowError, match=r"Node 12 \(SaveImage\), input 'filename_prefix'"):
        run_workflow(wf, host)
    assert not (tmp_path / "out").exists()


def test_path_traversal_is_refused_even_past_validation(host):
    with pytest.raises(CheckpointError, match="outside the model folders"):
        SPECS["WuerstchenLoadPrior"].execute(host, "../../etc/passwd", "auto")
    with pytest.raises(WorkflowError, match="outside the input folder"):
        SPECS["LoadImage"].execute(host, "../secret.png")


def test_stage_mismatch_at_run_time_is_a_clear_error(host):
    """A Stage C latent sent to Stage A decode passes the type check (both LATENT) and fails clearly."""
    wf = _broken(lambda wf: wf["11"]["inputs"].update(samples=["9", 0]))
    with pytest.raises(Exception, match=r"Stage A Decode, input 'samples': got a Stage C \(prior\) latent"):
        run_workflow(wf, host)


def test_ui_format_round_trip_and_file_runner(host, tmp_path, models_dir):
    api = small_workflow()
    ui = api_to_ui(api, SPECS, "small")
    back = ui_to_api(ui, SPECS)
    # optional widgets absent from the API workflow: defaults
    defaults = {"WuerstchenStageCSampler": {"fast_mode": False, "cuda_graphs": False},
                "WuerstchenStageBSampler": {"fast_mode": False, "cuda_graphs": False},
                "WuerstchenStageADecode": {"fast_mode": False}}
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in back.items()} == \
        {k: {**v, "inputs": v["inputs"] | defaults.get(v["class_type"], {})} for k, v in api.items()}
    sampler = next(n for n in ui["nodes"] if n["type"] == "WuerstchenStageCSampler")
    assert sampler["widgets_values"] == [3, "fixed", 1, 4.0, "ddim", 1.0, False, False]  # control_after_generate after seed
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(ui))
    assert load_workflow(path) == back
    res = run_workflow_file(path, models_dir=str(models_dir), output_dir=str(tmp_path / "o"), device="cpu")
    assert (tmp_path / "o" / res["ui"]["12"]["images"][0]["filename"]).is_file()


def test_ui_format_errors_name_the_node():
    ui = api_to_ui(small_workflow(), SPECS, "small")
    short = copy.deepcopy(ui)
    values = next(n for n in short["nodes"] if n["id"] == 9)["widgets_values"]
    del values[-2:]  # fast_mode and cuda_graphs, added after the first release: without them the defaults apply
    decode = next(n for n in short["nodes"] if n["type"] == "WuerstchenStageADecode")["widgets_values"]
    del decode[-1]  # Stage A Decode's fast_mode, added later still
    assert not {"fast_mode", "cuda_graphs"} & set(ui_to_api(short, SPECS)["9"]["inputs"])
    assert "fast_mode" not in ui_to_api(short, SPECS)["11"]["inputs"]
    del values[-1]
    with pytest.raises(WorkflowError, match=r"Node 9 \(WuerstchenStageCSampler\): widgets_values has 5 entries, "
                                            r"expected 8 \(no value for 'denoise'\)"):
        ui_to_api(short, SPECS)
    unknown = copy.deepcopy(ui)
    unknown["nodes"][0]["type"] = "Reroute"
    with pytest.raises(WorkflowError, match=r"Node 1: unknown node type 'Reroute'"):
        ui_to_api(unknown, SPECS)
    dangling = copy.deepcopy(ui)
    dangling["links"] = dangling["links"][1:]
    with pytest.raises(WorkflowError, match=r"link 1 is not in the workflow's links"):
        ui_to_api(dangling, SPECS)


def test_load_image_stand_in(host, tmp_path):
    write_test_image(tmp_path / "x.png", size=64)
    image, mask = SPECS["LoadImage"].execute(host, "x.png")
    assert image.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    assert mask[0, :, :32].min() == 1 and mask[0, :, 32:].max() == 0  # transparent = 1 = inpaint
    assert SPECS["LoadImage"].input("image").choices(host) == ["x.png"]
    assert {s.node_id for s in CORE_NODES} == {"LoadImage", "SaveImage", "PreviewImage"}


def test_unreadable_workflow_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WorkflowError, match="bad.json: cannot be read as JSON"):
        load_workflow(bad)
