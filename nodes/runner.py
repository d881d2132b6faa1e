"""Run an API-format (or UI-format) workflow of this pack's nodes without ComfyUI.

Besides the pack's nodes it knows minimal stand-ins for the ComfyUI core nodes the examples use
(LoadImage, SaveImage, PreviewImage). Every node is validated before anything runs: unknown
class_type, missing inputs, bad links (unknown node, output index out of range, type mismatch),
widget values of the wrong type, out of range or not in the list. Errors name the node id and field.
"""

import json
import os
import re

import numpy as np
import torch
from PIL import Image, ImageOps

from wuerstchen_core.errors import WorkflowError

from . import ALL_NODES
from .host import StandaloneHost
from .spec import Input, NodeResult, NodeSpec, Output, result
from .workflow_format import is_ui_workflow, ui_to_api

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------
# stand-ins for ComfyUI core nodes (same ids, inputs and outputs as ComfyUI's)


def _input_images(host):
    if not os.path.isdir(host.input_dir):
        return []
    return sorted(f for f in os.listdir(host.input_dir) if f.lower().endswith(IMAGE_EXTENSIONS))


def _load_image(host, image):
    if os.path.basename(image) != image:
        raise WorkflowError(f"LoadImage: image name {image!r} points outside the input folder; expected a file name.")
    img = ImageOps.exif_transpose(Image.open(os.path.join(host.input_dir, image)))
    rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
    if "A" in img.getbands():
        mask = 1.0 - torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)[None]
    else:
        mask = torch.zeros(1, 64, 64)
    return rgb, mask


def _save(host, images, prefix, kind):
    folder = host.output_dir if kind == "output" else os.path.join(host.output_dir, "temp")
    os.makedirs(folder, exist_ok=True)
    if os.path.basename(prefix) != prefix or not prefix:
        raise WorkflowError(f"SaveImage: filename_prefix {prefix!r} must be a plain file name prefix.")
    taken = [int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(re.escape(prefix) + r"_(\d+)_\.png", f))]
    saved = []
    for i, img in enumerate(images, start=max(taken, default=0) + 1):
        name = f"{prefix}_{i:05}_.png"
        Image.fromarray((img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(os.path.join(folder, name))
        saved.append({"filename": name, "subfolder": "", "type": kind})
    return NodeResult((), images=saved)


CORE_NODES = (
    NodeSpec("LoadImage", "Load Image", "Stand-in for ComfyUI's LoadImage.",
             (Input("image", "COMBO", "An image in the input folder.", options=_input_images, upload=True),),
             (Output("IMAGE", "IMAGE"), Output("MASK", "MASK")), _load_image, category="image"),
    NodeSpec("SaveImage", "Save Image", "Stand-in for ComfyUI's SaveImage.",
             (Input("images", "IMAGE", "Images to save."),
              Input("filename_prefix", "STRING", "File name prefix.", default="ComfyUI")),
             (), lambda host, images, filename_prefix: _save(host, images, filename_prefix, "output"),
             output_node=True, category="image"),
    NodeSpec("PreviewImage", "Preview Image", "Stand-in for ComfyUI's PreviewImage.",
             (Input("images", "IMAGE", "Images to preview."),), (),
             lambda host, images: _save(host, images, "preview", "temp"), output_node=True, category="image"),
)
SPECS = {s.node_id: s for s in (*ALL_NODES, *CORE_NODES)}


# ---------------------------------------------------------------------------------------------
# validation


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], (str, int))


def validate_workflow(prompt: dict, host, specs: dict = SPECS) -> list[str]:
    """Check every node and link; return the ids of the nodes to run, in execution order."""
    if not isinstance(prompt, dict) or not prompt:
        raise WorkflowError("Workflow: expected a non-empty API-format object {node_id: {class_type, inputs}}.")
    for nid, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise WorkflowError(f"Node {nid}: expected an object with 'class_type' and 'inputs'.")
        if not isinstance(node["class_type"], str):
            raise WorkflowError(f"Node {nid}: 'class_type' must be a string naming a node, "
                                f"got a {type(node['class_type']).__name__}.")
        spec = specs.get(node["class_type"])
        if spec is None:
            raise WorkflowError(f"Node {nid}: unknown class_type {node['class_type']!r}; expected one of this pack's "
                                "nodes or LoadImage, SaveImage, PreviewImage.")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"Node {nid} ({spec.node_id}): 'inputs' must be an object.")
        for inp in spec.inputs:
            where = f"Node {nid} ({spec.node_id}), input '{inp.name}'"
            if inp.name not in inputs:
                if not inp.optional:
                    raise WorkflowError(f"{where}: required input is missing.")
                continue
            value = inputs[inp.name]
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            elif _is_link(value):
                src_id, index = str(value[0]), value[1]
                src = prompt.get(src_id)
                if src is None:
                    raise WorkflowError(f"{where}: linked to node {src_id}, which is not in the workflow.")
                src_type = src.get("class_type") if isinstance(src, dict) else None
                src_spec = specs.get(src_type) if isinstance(src_type, str) else None
                if src_spec is None:
                    raise WorkflowError(f"{where}: linked to node {src_id}, which has no known class_type.")
                if not 0 <= index < len(src_spec.outputs):
                    raise WorkflowError(f"{where}: linked to output {index} of node {src_id} ({src_spec.node_id}), "
                                        f"which has {len(src_spec.outputs)} output(s).")
                out_type = src_spec.outputs[index].type
                want = "COMBO" if inp.type == "COMBO" else inp.type
                if out_type != want and "*" not in (out_type, want):
                    raise WorkflowError(f"{where}: linked to a {out_type} output of node {src_id} "
                                        f"({src_spec.node_id}), expected {inp.type}.")
                continue
            if not inp.is_widget:
                raise WorkflowError(f"{where}: got the value {value!r}, expected a link to a {inp.type} output.")
            if (problem := inp.check(value, host)) is not None:
                raise WorkflowError(f"{where}: {problem}.")
    return _execution_order(prompt, specs)


def _execution_order(prompt, specs) -> list[str]:
    """The output nodes and everything they depend on, dependencies first (ties by node id)."""
    deps = {nid: sorted({str(v[0]) for v in node.get("inputs", {}).values() if _is_link(v)}, key=_id_key)
            for nid, node in prompt.items()}
    outputs = sorted((nid for nid, node in prompt.items() if specs[node["class_type"]].output_node), key=_id_key)
    if not outputs:
        raise WorkflowError("Workflow: no output node; expected a SaveImage or PreviewImage node.")
    order, state = [], {}

    def visit(nid, path):
        if state.get(nid) == "done":
            return
        if state.get(nid) == "active":
            raise WorkflowError(f"Node {nid}: links form a cycle ({' -> '.join(path + [nid])}); expected an acyclic graph.")
        state[nid] = "active"
        for d in deps[nid]:
            visit(d, path + [nid])
        state[nid] = "done"
        order.append(nid)

    for nid in outputs:
        visit(nid, [])
    return order


def _id_key(nid):
    return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))


# ---------------------------------------------------------------------------------------------
# execution


def run_workflow(prompt: dict, host, specs: dict = SPECS) -> dict:
    """Validate and run `prompt` (API format). Returns {"outputs": {node_id: outputs tuple},
    "ui": {node_id: {"text": [...], "images": [...]}}}."""
    order = validate_workflow(prompt, host, specs)
    outputs, ui = {}, {}
    for nid in order:
        node = prompt[nid]
        spec = specs[node["class_type"]]
        kwargs = {}
        for inp in spec.inputs:
            if inp.name not in node["inputs"]:
                continue
            value = node["inputs"][inp.name]
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            elif _is_link(value):
                value = outputs[str(value[0])][value[1]]
            kwargs[inp.name] = value
        host.label = f"node {nid} ({spec.display_name})"
        res = result(spec.execute(host, **kwargs))
        outputs[nid] = res.outputs
        if res.text or res.images:
            ui[nid] = {k: v for k, v in (("text", [res.text] if res.text else None), ("images", res.images)) if v}
    return {"outputs": outputs, "ui": ui}


def load_workflow(path) -> dict:
    """An API-format prompt from a .json file in API or UI format."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WorkflowError(f"Workflow {path}: cannot be read as JSON ({e}).") from None
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # a /prompt request body
    if not is_ui_workflow(data):
        return data
    try:
        return ui_to_api(data, SPECS)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise WorkflowError(f"Workflow {path}: not a valid UI-format workflow ({e}).") from None


def run_workflow_file(path, models_dir, output_dir, device="cpu", input_dir=None, on_progress=None) -> dict:
    """Run the workflow at `path` with models from `models_dir` (ComfyUI layout: wuerstchen/,
    diffusion_models/, text_encoders/, vae/, ...), images read from `input_dir` (default: the
    workflow's folder) and written to `output_dir`. Returns run_workflow's result."""
    host = StandaloneHost(models_dir, device=device, output_dir=output_dir,
                          input_dir=input_dir or os.path.dirname(os.path.abspath(path)), on_progress=on_progress)
    return run_workflow(load_workflow(path), host)
