"""The example workflows: UI files are well-formed and match the API files, every node and link
validates against the node specs, and each runs end to end through the runner with tiny models."""

import importlib.util
import json
from pathlib import Path

import pytest

from nodes.host import StandaloneHost
from nodes.runner import SPECS, run_workflow_file, validate_workflow
from nodes.workflow_format import PACK_ID, ui_to_api
from tests.helpers.tiny_pack import write_test_image, write_tiny_models

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def _ui(name):
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def _api(name):
    return json.loads((EXAMPLES / "api" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    write_test_image(d / "example.png", size=256)
    return d


def test_the_expected_examples_exist():
    assert set(NAMES) >= {"wuerstchen_text_to_image", "wuerstchen_batch_of_4_per_image_seeds",
                          "wuerstchen_image_variation", "wuerstchen_stage_c_img2img",
                          "wuerstchen_stage_b_inpainting", "wuerstchen_sdxl_clip_g_text_encoder"}
    assert sorted(p.stem for p in (EXAMPLES / "api").glob("*.json")) == NAMES


def test_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.EXAMPLES) == NAMES
    for name, api in module.EXAMPLES.items():
        assert api == _api(name), f"{name}: run example_workflows/make_examples.py"
        ui = module.api_to_ui(api, SPECS, name)
        assert ui == _ui(name), f"{name}: run example_workflows/make_examples.py"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_well_formed(name):
    ui = _ui(name)
    assert ui["version"] == 0.4 and ui["id"]
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    for node in ui["nodes"]:
        spec = SPECS[node["type"]]
        props = node["properties"]
        assert props["Node name for S&R"] == node["type"]
        assert props["cnr_id"] == ("comfy-core" if node["type"] in ("LoadImage", "SaveImage", "PreviewImage") else PACK_ID)
        assert [i["name"] for i in node["inputs"]] == [i.name for i in spec.inputs if not i.is_widget]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == [(o.name, o.type) for o in spec.outputs]
        assert len(node["widgets_values"]) == sum(1 + i.ui_extra_values for i in spec.widgets)
        values = iter(node["widgets_values"])
        for inp in spec.widgets:
            value = next(values)
            assert inp.type == "COMBO" or inp.check(value, None) is None, (node["id"], inp.name, value)
            if inp.control_after_generate:
                assert next(values) in CONTROL_VALUES
            if inp.upload:
                assert next(values) == "image"
        for slot, inp in enumerate(node["inputs"]):
            if inp["link"] is None:
                assert spec.input(inp["name"]).optional, (name, node["id"], inp["name"])
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        out = nodes[origin]["outputs"][origin_slot]
        inp = nodes[target]["inputs"][target_slot]
        assert out["type"] == inp["type"] == link_type, (name, link_id)
        assert link_id in out["links"] and inp["link"] == link_id


@pytest.mark.parametrize("name", NAMES)
def test_ui_converts_to_the_api_file_and_validates(name, models_dir, input_dir):
    api = _api(name)
    assert ui_to_api(_ui(name), SPECS) == api
    host = StandaloneHost(str(models_dir), input_dir=str(input_dir))
    order = validate_workflow(api, host)
    assert set(order) == set(api)  # every node contributes to an output


def _small(api):
    """The same graph at test size: 256 px, 1–2 steps."""
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "WuerstchenEmptyLatent":
            inputs.update(width=256, height=256)
        elif node["class_type"] == "WuerstchenStageCSampler":
            inputs.update(steps=2)
        elif node["class_type"] == "WuerstchenStageBSampler":
            inputs.update(steps=1)
    return api


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_end_to_end(name, models_dir, input_dir, tmp_path):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(_small(_api(name))))
    out = tmp_path / "out"
    res = run_workflow_file(path, models_dir=str(models_dir), output_dir=str(out), input_dir=str(input_dir))
    saved = [img for ui in res["ui"].values() for img in ui.get("images", [])]
    expected = 4 if "batch_of_4" in name else 1
    assert len(saved) == expected and all((out / s["filename"]).is_file() for s in saved)
    decoded = next(v[0] for nid, v in res["outputs"].items() if _api(name)[nid]["class_type"] == "WuerstchenStageADecode")
    assert decoded.shape == (expected, 256, 256, 3)
    if expected == 4:  # per-image seeds: four different images
        assert all(not decoded[0].equal(decoded[i]) for i in range(1, 4))
