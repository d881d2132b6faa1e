"""The pack inside a real ComfyUI: import, registration, a text-to-image run, caching, clean errors, templates.

ComfyUI is not a package, so this only runs where COMFYUI_DIR points at a ComfyUI checkout (see
scripts/setup_comfyui.sh); COMFYUI_PYTHON is the interpreter of its venv (default: this one). The server
is started once for the module as a subprocess listening on 127.0.0.1 only, with every folder it writes
to (models, output, input, user, temp) in a temporary directory and the pack loaded from a
`custom_nodes:` entry of an extra-model-paths yaml. Models are tiny random-weight files built here.
"""

import dataclasses
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="COMFYUI_DIR is not set: ComfyUI is not installable from a registry; "
    "run scripts/setup_comfyui.sh and set COMFYUI_DIR (and COMFYUI_PYTHON) to run the ComfyUI integration test")

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NAME = "wuerstchen-v2-nodes"  # the folder name the pack gets under custom_nodes (as after a git clone)
SIZE = 256  # smallest allowed image side: Stage C grid 6×6, Stage B grid 64×64
READY_TIMEOUT = 120
RUN_TIMEOUT = 180
T2I_EXAMPLE = "wuerstchen_text_to_image.json"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}  # control_after_generate widget entries

# file names of the tiny models, by loader kind (text encoders by tower)
FILES = {"prior": "tiny_prior.safetensors", "decoder": "tiny_decoder.safetensors",
         "vqgan": "tiny_vqgan.safetensors", "effnet": "tiny_effnet.safetensors",
         "bigG": "tiny_clip_bigG.safetensors", "H": "tiny_clip_H.safetensors"}


# ---------------------------------------------------------------------------------------------
# tiny models in ComfyUI model folders


def _write_models(root: Path) -> dict[str, Path]:
    """Tiny random models whose widths chain like the real ones (Stage C latent 16 channels, text widths
    = conditioning widths) in the folders a user would use: Würstchen files in `wuerstchen`, the text
    towers in `text_encoders`. Returns the folder per yaml key."""
    from safetensors.torch import save_file

    from wuerstchen_core.models.effnet import EfficientNetEncoder

    from tests.helpers.tiny_effnet import TINY_EFFNET, randomize_effnet_
    from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
    from tests.helpers.tiny_text import tiny_text_model

    text_width = 128  # 2 heads of 64: inferable without a config.json
    folders = {"wuerstchen": root / "wuerstchen", "text_encoders": root / "text_encoders"}
    for f in folders.values():
        f.mkdir(parents=True)
    models = {"prior": tiny_prior(c_in=16, c_cond=text_width), "decoder": tiny_decoder(effnet_embd=16, clip_embd=text_width),
              "vqgan": tiny_vqgan(),
              "effnet": randomize_effnet_(EfficientNetEncoder(dataclasses.replace(TINY_EFFNET, c_latent=16)))}
    for kind, model in models.items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folders["wuerstchen"] / FILES[kind])
    for seed, tower in enumerate(("bigG", "H")):
        sd = tiny_text_model(seed, hidden_size=text_width).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, folders["text_encoders"] / FILES[tower])
    (folders["wuerstchen"] / "README.txt").write_text("not a model: must not be listed\n")
    return folders


def _write_input_image(path: Path):
    """The examples' LoadImage picture: SIZE² RGBA, a smooth gradient with a transparent centre (the inpainting mask)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgba = np.stack([x, y, 1 - x * y, np.ones_like(x)], -1)
    rgba[SIZE // 4:3 * SIZE // 4, SIZE // 4:3 * SIZE // 4, 3] = 0
    Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").save(path)


# ---------------------------------------------------------------------------------------------
# the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, dirs: dict[str, Path], models: dict[str, Path]):
        self.url, self.proc, self.log, self.dirs, self.models = url, proc, log, dirs, models

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body=None, timeout=30):
        """(HTTP status, decoded JSON or raw bytes)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw)

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body!r:.500}\n{self.tail()}"
        return body

    def tail(self, n=60) -> str:
        return "--- ComfyUI log (tail) ---\n" + "\n".join(self.log_text().splitlines()[-n:])

    def queue(self, prompt: dict, client_id: str = "wuerstchen-test") -> str:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, f"/prompt refused the workflow ({status}): {json.dumps(body, indent=1)[:3000]}"
        assert body["node_errors"] == {}, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout=RUN_TIMEOUT) -> dict:
        """The history entry of a finished prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited with {self.proc.returncode}\n{self.tail()}"
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)  # present once the prompt is done
            if entry:
                return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.tail()}")

    def run(self, prompt: dict) -> dict:
        return self.wait(self.queue(prompt))


def messages(entry: dict) -> dict:
    """History status messages by event name (the last of each)."""
    return {event: data for event, data in entry["status"]["messages"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(COMFYUI_DIR).resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} is not a ComfyUI checkout (no main.py)")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    tmp = tmp_path_factory.mktemp("comfyui")
    dirs = {name: tmp / name for name in ("custom_nodes", "output", "input", "user", "temp")}
    for d in dirs.values():
        d.mkdir()
    (dirs["custom_nodes"] / PACK_NAME).symlink_to(PACK_DIR, target_is_directory=True)
    models = _write_models(tmp / "models")
    _write_input_image(dirs["input"] / "example.png")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text("wuerstchen_test:\n" + "".join(
        f"    {key}: {json.dumps(str(path))}\n"
        for key, path in {"custom_nodes": dirs["custom_nodes"], **models}.items()))
    port = _free_port()
    log = tmp / "comfyui.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(yaml), "--output-directory", str(dirs["output"]),
           "--input-directory", str(dirs["input"]), "--user-directory", str(dirs["user"]),
           "--temp-directory", str(dirs["temp"]), "--database-url", "sqlite:///:memory:",
           "--disable-api-nodes", "--preview-method", "auto"]
    # No PYTHONPATH: the pack must make its own imports work, as in a user's ComfyUI. Offline: nothing downloads.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, dirs, models)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} before it was ready\n{srv.tail()}")
            try:
                if srv.request("GET", "/object_info", timeout=10)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer /object_info within {READY_TIMEOUT} s\n{srv.tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


# ---------------------------------------------------------------------------------------------
# workflows


def _pack_node_ids() -> list[str]:
    from nodes import ALL_NODES  # the pack's own list of node specs
    return [spec.node_id for spec in ALL_NODES]


def _example(name: str) -> dict:
    return json.loads((PACK_DIR / "example_workflows" / name).read_text())


def _example_names() -> list[str]:
    return sorted(p.name for p in (PACK_DIR / "example_workflows").glob("*.json"))


def _combo_options(spec) -> list | None:
    """The options of a COMBO input in /object_info's V1 shape, else None."""
    kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        return kind
    return opts.get("options") if kind == "COMBO" else None


def _is_widget(spec) -> bool:
    return _combo_options(spec) is not None or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI (graph) workflow -> API prompt, as the frontend does: links from `links`, widget values matched
    in order to the widget inputs of /object_info, skipping control_after_generate entries. Muted or
    bypassed nodes and frontend-only nodes (notes) are left out."""
    links = {link[0]: link for link in workflow["links"]} if workflow["links"] and isinstance(workflow["links"][0], list) \
        else {link["id"]: [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                           link["type"]] for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] not in object_info:
            assert node["type"] in ("Note", "MarkdownNote") or node.get("mode", 0) != 0, \
                f"example workflow uses node type {node['type']!r} that ComfyUI does not know"
            continue
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", list(info["input"].get("required", {}))) + \
            order.get("optional", list(info["input"].get("optional", {})))
        inputs = {}
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                linked[inp["name"]] = [str(src), slot]
        values = node.get("widgets_values", [])
        widgets = [n for n in names if _is_widget(specs[n])]
        if isinstance(values, dict):
            inputs |= {n: values[n] for n in widgets if n in values}
        else:
            values = list(values)
            for n in widgets:
                if not values:
                    break
                inputs[n] = values.pop(0)
                opts = specs[n][1] if len(specs[n]) > 1 else {}
                if specs[n][0] == "INT" and values and values[0] in CONTROL_VALUES:
                    values.pop(0)
                elif opts.get("image_upload") and values and values[0] == "image":
                    values.pop(0)  # the value of the frontend's upload button
            assert not values, f"{node['type']} (node {node['id']}): {len(values)} widget values left over: {values}"
        inputs |= linked
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] == class_type]


def _one(prompt: dict, class_type: str) -> str:
    ids = _nodes_of(prompt, class_type)
    assert len(ids) == 1, f"expected one {class_type} node, found {ids}"
    return ids[0]


def _tiny(prompt: dict) -> dict:
    """Point the loaders at the tiny files and make the run small."""
    towers = {"bigG": "bigG", "H": "H"}
    for node in prompt.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "WuerstchenLoadTextEncoder":
            tower = next(t for t in towers if t in str(inputs["tower"]))
            inputs["model_name"] = FILES[tower]
        elif ct.startswith("WuerstchenLoad"):
            kind = {"WuerstchenLoadPrior": "prior", "WuerstchenLoadDecoder": "decoder",
                    "WuerstchenLoadVQGAN": "vqgan", "WuerstchenLoadEffNet": "effnet"}[ct]
            inputs["model_name"] = FILES[kind]
        if "weight_dtype" in inputs:
            inputs["weight_dtype"] = "auto"
        for side in ("width", "height"):
            if side in inputs and not isinstance(inputs[side], list):
                inputs[side] = SIZE
        if "batch_size" in inputs and not isinstance(inputs["batch_size"], list):
            inputs["batch_size"] = min(inputs["batch_size"], 2)
        if ct in ("WuerstchenStageCSampler", "WuerstchenStageBSampler"):
            inputs["steps"] = 3
    return prompt


@pytest.fixture(scope="module")
def t2i(server, object_info):
    """The text-to-image example as an API prompt with the tiny models, and its first (successful) run."""
    assert T2I_EXAMPLE in _example_names(), f"no {T2I_EXAMPLE} in example_workflows/: {_example_names()}"
    prompt = _tiny(to_api(_example(T2I_EXAMPLE), object_info))
    entry = server.run(prompt)
    return prompt, entry


def _saved_images(server: Server, entry: dict) -> list[Path]:
    files = []
    for output in entry["outputs"].values():
        for img in output.get("images", []):
            if img.get("type") == "output":
                files.append(server.dirs["output"] / img.get("subfolder", "") / img["filename"])
    return files


# ---------------------------------------------------------------------------------------------
# tests


def test_pack_imports_without_errors(server, object_info):
    log = server.log_text()
    pack_path = str(server.dirs["custom_nodes"] / PACK_NAME)
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
    assert not failed, f"the pack failed to import:\n{failed}\n{server.tail(120)}"
    assert not re.search(rf"Cannot import .*{re.escape(PACK_NAME)}", log), server.tail(120)
    assert re.search(rf"^\s*[\d.]+ seconds: {re.escape(pack_path)}$", log, re.M), \
        f"ComfyUI did not report loading {pack_path}\n{server.tail(120)}"


def test_every_pack_node_is_registered(object_info):
    ids = _pack_node_ids()
    assert ids, "the pack's registry lists no nodes"
    missing = [i for i in ids if i not in object_info]
    assert not missing, f"nodes defined by the pack but absent from /object_info: {missing}"
    for node_id in ids:
        info = object_info[node_id]
        assert info["display_name"], f"{node_id} has no display name"
        assert info["category"].startswith("Wuerstchen"), f"{node_id}: category {info['category']!r}"
        assert info["python_module"].startswith("custom_nodes."), info["python_module"]


def test_node_schemas_match_the_specs(object_info):
    """What ComfyUI serves for each V3 node (the V1 shape the frontend reads) is what the spec says."""
    from nodes import ALL_NODES
    for spec in ALL_NODES:
        info = object_info[spec.node_id]
        required, optional = info["input"].get("required", {}), info["input"].get("optional", {})
        assert list(required) == [i.name for i in spec.inputs if not i.optional], spec.node_id
        assert list(optional) == [i.name for i in spec.inputs if i.optional], spec.node_id
        for inp in spec.inputs:
            served = (optional if inp.optional else required)[inp.name]
            options = _combo_options(served)
            if inp.type == "COMBO":
                assert options is not None, f"{spec.node_id}.{inp.name} is not a combo: {served}"
                if not callable(inp.options):
                    assert list(options) == list(inp.options), (spec.node_id, inp.name, options)
            else:
                assert served[0] == inp.type, (spec.node_id, inp.name, served)
            extra = served[1] if len(served) > 1 else {}
            for key in ("default", "min", "max"):
                if getattr(inp, key) is not None:
                    assert extra.get(key) == getattr(inp, key), (spec.node_id, inp.name, key, extra)
            if inp.control_after_generate:
                assert extra.get("control_after_generate"), (spec.node_id, inp.name, extra)
        assert info["output"] == [o.type for o in spec.outputs], spec.node_id
        assert info["output_name"] == [o.name for o in spec.outputs], spec.node_id
        assert info["output_node"] == spec.output_node, spec.node_id


def test_loaders_list_the_model_folders(object_info):
    """The yaml's `wuerstchen` entry (created before the pack loads) is merged, not replaced; text
    encoders come from `text_encoders`; non-model files are not offered."""
    want = {"WuerstchenLoadPrior": "prior", "WuerstchenLoadDecoder": "decoder", "WuerstchenLoadVQGAN": "vqgan",
            "WuerstchenLoadEffNet": "effnet"}
    for node_id, kind in want.items():
        options = _combo_options(object_info[node_id]["input"]["required"]["model_name"])
        assert FILES[kind] in options, f"{node_id} does not list {FILES[kind]}: {options}"
        assert "README.txt" not in options, f"{node_id} lists a non-model file: {options}"
    options = _combo_options(object_info["WuerstchenLoadTextEncoder"]["input"]["required"]["model_name"])
    assert {FILES["bigG"], FILES["H"]} <= set(options), options


def test_model_folder_is_registered_with_extensions(server):
    """GET /models/wuerstchen (model managers use it) filters by extension: the folder entry has an extension set."""
    assert "wuerstchen" in server.get("/api/models")
    listed = server.get("/api/models/wuerstchen")
    assert {FILES[k] for k in ("prior", "decoder", "vqgan", "effnet")} <= set(listed), listed
    assert "README.txt" not in listed, listed


def test_text_to_image_example_runs_and_saves_an_image(server, t2i):
    prompt, entry = t2i
    msgs = messages(entry)
    assert entry["status"]["status_str"] == "success", \
        f"{json.dumps(msgs.get('execution_error'), indent=1)[:4000]}\n{server.tail()}"
    files = _saved_images(server, entry)
    assert files, f"no image in the outputs: {entry['outputs']}"
    # the empty latent node reports the size it used (ui.PreviewText)
    assert entry["outputs"][_one(prompt, "WuerstchenEmptyLatent")] == {"text": [f"{SIZE}×{SIZE}"]}, entry["outputs"]
    from PIL import Image
    for f in files:
        assert f.is_file(), f"{f} was reported but not written"
        with Image.open(f) as im:
            assert im.size == (SIZE, SIZE), im.size


SAMPLERS = ("WuerstchenStageCSampler", "WuerstchenStageBSampler")


def _pixels_with_option(server, t2i, option, node_types=SAMPLERS):
    """The text-to-image workflow run again with `option` on in the nodes of `node_types`: (eager pixels,
    its pixels)."""
    import numpy as np
    from PIL import Image

    prompt, eager_entry = t2i
    changed = _fresh_samplers(prompt, 0)
    for node_type in node_types:
        changed[_one(changed, node_type)]["inputs"][option] = True
    changed[_one(changed, "SaveImage")]["inputs"]["filename_prefix"] = option
    entry = server.run(changed)
    assert entry["status"]["status_str"] == "success", \
        f"{json.dumps(messages(entry).get('execution_error'), indent=1)[:4000]}\n{server.tail()}"
    (eager_file,), (file,) = _saved_images(server, eager_entry), _saved_images(server, entry)
    with Image.open(eager_file) as a, Image.open(file) as b:
        return np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)


def test_fast_mode_compiles_inside_comfyui(server, t2i):
    """The samplers' and Stage A Decode's fast_mode option: torch.compile (inductor, on this CPU) inside
    ComfyUI's executor, which runs nodes under inference_mode. The image is the eager one up to
    inductor's float reordering."""
    eager, fast = _pixels_with_option(server, t2i, "fast_mode", (*SAMPLERS, "WuerstchenStageADecode"))
    diff = abs(eager - fast)
    assert diff.mean() < 2 and (diff > 8).mean() < 0.01, (diff.mean(), (diff > 8).mean())  # saturated pixels may flip
    log = server.log_text()  # the first run at a size says that it compiles, and how long that took
    for stage in ("the Stage C prior", "the Stage B decoder", "Stage A's blocks"):
        assert re.search(rf"Würstchen fast mode: {re.escape(stage)} for input [\d×]+ ready after [\d.]+ s", log), \
            server.tail()


def test_cuda_graphs_option_inside_comfyui(server, t2i):
    """The samplers' cuda_graphs option through ComfyUI's executor. On this CPU the wrapped network runs
    its plain steps (CUDA graphs need CUDA), so the image is exactly the eager one; both options on is
    one clear node error."""
    eager, graphed = _pixels_with_option(server, t2i, "cuda_graphs")
    assert (eager == graphed).all()
    both = _fresh_samplers(t2i[0], 1)
    both[_one(both, "WuerstchenStageCSampler")]["inputs"].update(cuda_graphs=True, fast_mode=True)
    entry = server.run(both)
    error = messages(entry).get("execution_error") or {}
    assert "fast_mode and cuda_graphs are both on" in error.get("exception_message", ""), error


@pytest.mark.parametrize("name", [n for n in _example_names() if n != T2I_EXAMPLE])
def test_example_workflow_runs(server, object_info, name):
    prompt = _tiny(to_api(_example(name), object_info))
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", \
        f"{json.dumps(messages(entry).get('execution_error'), indent=1)[:4000]}\n{server.tail()}"
    batch = max([n["inputs"]["batch_size"] for n in prompt.values() if "batch_size" in n["inputs"]] or [1])
    files = _saved_images(server, entry)
    assert len(files) == batch, f"{len(files)} images saved, expected {batch}: {entry['outputs']}"
    from PIL import Image
    import numpy as np
    pixels = [np.asarray(Image.open(f)) for f in files]
    assert all(p.shape == (SIZE, SIZE, 3) for p in pixels), [p.shape for p in pixels]
    if batch > 1:  # image i uses seed + i
        assert not np.array_equal(pixels[0], pixels[1]), "the images of a batch are identical"


def test_requeue_reuses_loaded_models(server, t2i):
    prompt, first = t2i
    assert first["status"]["status_str"] == "success"
    # the same prompt twice (other tests ran in between): the second comes from the cache entirely
    server.run(prompt)
    again = server.run(prompt)
    assert again["status"]["status_str"] == "success"
    cached = set(messages(again)["execution_cached"]["nodes"])
    assert cached == set(prompt), f"not cached on an identical re-queue: {set(prompt) - cached}"
    # a new seed: loaders and text encoders are reused (no reload), the samplers run again
    changed = json.loads(json.dumps(prompt))
    c_sampler = _one(changed, "WuerstchenStageCSampler")
    changed[c_sampler]["inputs"]["seed"] += 1
    before = set(map(str, _saved_images(server, first)))
    log_start = len(server.log_text())
    entry = server.run(changed)
    assert entry["status"]["status_str"] == "success", json.dumps(messages(entry).get("execution_error"))[:3000]
    cached = set(messages(entry)["execution_cached"]["nodes"])
    reused = {i for i, n in changed.items() if n["class_type"].startswith(("WuerstchenLoad", "WuerstchenTextEncode"))}
    assert reused and reused <= cached, f"models or encodings were not reused: {reused - cached}"
    assert c_sampler not in cached
    # the samplers found their models already on the device: no new ModelPatcher, no load
    run_log = server.log_text()[log_start:]
    assert "Requested to load" not in run_log, f"models were loaded again:\n{run_log}"
    new = set(map(str, _saved_images(server, entry))) - before
    assert new and all(Path(f).is_file() for f in new), "the re-run wrote no new image"


def _assert_clean_error(server: Server, entry: dict, node_type: str, exc_name: str, *words: str):
    assert entry["status"]["status_str"] == "error"
    err = messages(entry).get("execution_error")
    assert err, f"no execution_error message: {entry['status']}"
    assert err["node_type"] == node_type, err
    assert err["exception_type"].endswith(exc_name), (err["exception_type"], err["exception_message"])
    msg = err["exception_message"].strip()  # ComfyUI appends a newline
    assert msg.count("\n") == 0 and len(msg) < 600, f"not one clear sentence: {msg!r}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert server.proc.poll() is None, "ComfyUI died"


def test_stage_b_latent_into_stage_c_sampler_is_a_clean_error(server, t2i):
    prompt, _ = t2i
    bad = {k: v for k, v in json.loads(json.dumps(prompt)).items() if v["class_type"] != "SaveImage"}
    c_sampler, b_sampler = _one(bad, "WuerstchenStageCSampler"), _one(bad, "WuerstchenStageBSampler")
    bad["900"] = json.loads(json.dumps(bad[c_sampler]))
    bad["900"]["inputs"]["latent"] = [b_sampler, 0]
    bad["901"] = {"class_type": "SaveLatent", "inputs": {"samples": ["900", 0], "filename_prefix": "latents/bad"}}
    entry = server.run(bad)
    _assert_clean_error(server, entry, "WuerstchenStageCSampler", "StageMismatchError", "Stage B", "Stage C")
    # the server keeps working: a normal run succeeds afterwards
    ok = json.loads(json.dumps(prompt))
    ok[_one(ok, "WuerstchenStageBSampler")]["inputs"]["seed"] += 7
    after = server.run(ok)
    assert after["status"]["status_str"] == "success", json.dumps(messages(after).get("execution_error"))[:3000]


def test_wrong_file_in_a_loader_is_a_clean_error(server, t2i):
    prompt, _ = t2i
    bad = json.loads(json.dumps(prompt))
    loader = _one(bad, "WuerstchenLoadPrior")
    bad[loader]["inputs"]["model_name"] = FILES["decoder"]
    entry = server.run(bad)
    _assert_clean_error(server, entry, "WuerstchenLoadPrior", "WrongComponentError", FILES["decoder"])


def test_example_workflows_are_served_as_templates(server, object_info):
    names = _example_names()
    assert names, "example_workflows/ holds no workflow"
    templates = server.get("/api/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(Path(n).stem for n in names), templates
    for name in names:
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{name}")
        served = json.loads(served) if isinstance(served, bytes) else served
        assert served == _example(name), f"{name} is served differently from the file"
        prompt = to_api(served, object_info)  # every node type known, widget values matching the schemas
        assert prompt, f"{name} has no executable node"


def _fresh_samplers(prompt: dict, offset: int) -> dict:
    """A copy of `prompt` whose sampler seeds differ, so both samplers run again (everything else cached)."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] in ("WuerstchenStageCSampler", "WuerstchenStageBSampler"):
            node["inputs"]["seed"] += offset
    return out


def test_progress_and_previews_reach_a_websocket_client(server, t2i):
    websocket = pytest.importorskip(
        "websocket", reason="websocket-client is not installed in this interpreter (the venv that "
        "scripts/setup_comfyui.sh makes has it); progress and preview messages are not checked")
    prompt = _fresh_samplers(t2i[0], 100)
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.url.rsplit(':', 1)[1]}/ws?clientId={client_id}",
                                     timeout=RUN_TIMEOUT)
    progress, previews = defaultdict(list), []
    try:
        prompt_id = server.queue(prompt, client_id)
        while True:
            frame = ws.recv()
            if isinstance(frame, bytes):
                event, image_type = struct.unpack(">II", frame[:8])
                if event == 1:  # BinaryEventTypes.PREVIEW_IMAGE
                    previews.append(frame[8:])
                continue
            msg = json.loads(frame)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            assert msg["type"] != "execution_error", json.dumps(data)[:3000]
            if msg["type"] == "progress":
                progress[data["node"]].append((data["value"], data["max"]))
            if msg["type"] == "executing" and data["node"] is None and data.get("prompt_id") == prompt_id:
                break
    finally:
        ws.close()
    for class_type in ("WuerstchenStageCSampler", "WuerstchenStageBSampler", "WuerstchenStageADecode"):
        node = _one(prompt, class_type)
        steps = progress.get(node)
        assert steps, f"no progress from {class_type} (node {node}): {dict(progress)}"
        assert steps[-1][0] == steps[-1][1], f"{class_type} progress did not reach its end: {steps}"
    n_steps = sum(len(progress[_one(prompt, c)]) for c in ("WuerstchenStageCSampler", "WuerstchenStageBSampler"))
    assert len(previews) >= n_steps, f"{len(previews)} previews for {n_steps} sampler steps"
    assert all(p[:2] == b"\xff\xd8" for p in previews), "previews are not JPEG images"


def test_interrupt_stops_a_run(server, t2i):
    prompt = _fresh_samplers(t2i[0], 200)
    prompt[_one(prompt, "WuerstchenStageBSampler")]["inputs"]["steps"] = 1000  # minutes on a CPU
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 60
    while not any(item[1] == prompt_id for item in server.get("/queue")["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(2)  # well inside the sampling loop
    status, _ = server.request("POST", "/interrupt", {})
    assert status == 200
    entry = server.wait(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "error", entry["status"]
    interrupted = messages(entry).get("execution_interrupted")
    assert interrupted, entry["status"]["messages"]
    assert interrupted["node_type"] in ("WuerstchenStageCSampler", "WuerstchenStageBSampler"), interrupted
    assert server.proc.poll() is None


def test_api_examples_match_the_ui_examples(object_info):
    """example_workflows/api/*.json (for the CLI runner and scripts) say what ComfyUI makes of the UI files."""
    api_dir = PACK_DIR / "example_workflows" / "api"
    if not api_dir.is_dir():
        pytest.skip("the pack ships no API-format examples")
    for name in _example_names():
        api = json.loads((api_dir / name).read_text())
        strip = {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in api.items()}
        assert strip == to_api(_example(name), object_info), f"api/{name} differs from {name} as ComfyUI reads it"


def test_new_model_files_are_listed_without_a_restart(server):
    """The loaders' lists are rebuilt on each /object_info request (the frontend's refresh), subfolders included."""
    sub = server.models["wuerstchen"] / "later"
    sub.mkdir(exist_ok=True)
    (sub / "added.safetensors").write_bytes((server.models["wuerstchen"] / FILES["prior"]).read_bytes())
    info = server.get("/object_info/WuerstchenLoadPrior")["WuerstchenLoadPrior"]
    assert "later/added.safetensors" in _combo_options(info["input"]["required"]["model_name"])
