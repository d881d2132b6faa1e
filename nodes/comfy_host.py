"""The one module that imports ComfyUI: the ComfyUI Host, and the V3 node classes built from our specs.

Models are wrapped in ComfyUI's ModelPatcher and moved by comfy.model_management (load_models_gpu
before use, so other models are offloaded first); progress and previews go through
comfy.utils.ProgressBar, whose update is also an interrupt point.
"""

import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy.cli_args import LatentPreviewMethod, args
from comfy_api.latest import ComfyExtension, io, ui

from . import ALL_NODES
from .host import MODEL_FOLDERS, Host, Progress
from .spec import result

def register_model_folder():
    """models/wuerstchen, merged with any entry extra_model_paths.yaml created, with an extension set."""
    default = os.path.join(folder_paths.models_dir, "wuerstchen")
    paths, exts = folder_paths.folder_names_and_paths.get("wuerstchen", ([], set()))
    paths = [default] + [p for p in paths if os.path.normpath(p) != os.path.normpath(default)]
    folder_paths.folder_names_and_paths["wuerstchen"] = (paths, set(exts) | set(folder_paths.supported_pt_extensions))


class _Holder(torch.nn.Module):
    """ModelPatcher sets attributes such as `device` on the module it manages; transformers models
    have a read-only `device` property, so every model is handed over inside this plain container."""

    def __init__(self, module):
        super().__init__()
        self.inner = module


class ComfyProgress(Progress):
    def __init__(self, total):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, step, preview=None):
        mm.throw_exception_if_processing_interrupted()
        preview = ("JPEG", preview, args.preview_size) if preview is not None else None
        self.bar.update_absolute(step, self.bar.total, preview)


class ComfyHost(Host):
    def model_dirs(self, kind):
        dirs = []
        for folder in MODEL_FOLDERS[kind]:
            dirs += [d for d in folder_paths.get_folder_paths(folder) if d not in dirs]
        return dirs

    def auto_dtype(self, kind):
        if kind in ("prior", "decoder"):  # Würstchen v2 runs in fp16 (the pipeline reruns in bf16 on overflow)
            return mm.unet_dtype(mm.get_torch_device(), supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
        if kind == "text_encoder":  # our CLIP layers do not cast per op, so no fp16 weights on CPU
            device = mm.text_encoder_device()
            return torch.float32 if device.type == "cpu" else mm.text_encoder_dtype(device)
        if kind == "vqgan":
            return mm.vae_dtype(mm.vae_device(), allowed_dtypes=[torch.bfloat16, torch.float32])
        return torch.float32  # effnet: BatchNorm statistics stay in fp32

    def wrap(self, kind, model, module, name, tower=None):
        loaded = super().wrap(kind, model, module, name, tower)
        if kind == "text_encoder":
            load, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
        elif kind in ("vqgan", "effnet"):
            load, offload = mm.vae_device(), mm.vae_offload_device()
        else:
            load, offload = mm.get_torch_device(), mm.unet_offload_device()
        loaded.patcher = comfy.model_patcher.ModelPatcher(_Holder(module), load_device=load, offload_device=offload)
        return loaded

    def load(self, *models, activations=0):
        patchers = [m.patcher for m in models if m is not None]
        # Full loads: our layers are plain torch modules, which ModelPatcher cannot run partially loaded.
        # memory_required: ComfyUI offloads other models until the stage's activations fit as well.
        mm.load_models_gpu(patchers, memory_required=activations, force_full_load=True)
        return patchers[0].load_device

    def progress(self, total):
        return ComfyProgress(total)

    def wants_previews(self):  # --preview-method none turns previews off, as for ComfyUI's own samplers
        return args.preview_method != LatentPreviewMethod.NoPreviews

    def intermediate_device(self):
        return mm.intermediate_device()


HOST = ComfyHost()
_SOCKETS = {"IMAGE": io.Image, "LATENT": io.Latent, "MASK": io.Mask, "CONDITIONING": io.Conditioning}
_CUSTOM = {}


def _socket_type(name):
    if name in _SOCKETS:
        return _SOCKETS[name]
    return _CUSTOM.setdefault(name, io.Custom(name))


def _input(inp):
    kw = dict(optional=inp.optional, tooltip=inp.tooltip)
    if inp.type == "INT":
        return io.Int.Input(inp.name, default=inp.default, min=inp.min, max=inp.max, step=inp.step,
                            control_after_generate=inp.control_after_generate or None, **kw)
    if inp.type == "FLOAT":
        return io.Float.Input(inp.name, default=inp.default, min=inp.min, max=inp.max, step=inp.step, **kw)
    if inp.type == "STRING":
        return io.String.Input(inp.name, default=inp.default, multiline=inp.multiline, **kw)
    if inp.type == "BOOLEAN":
        return io.Boolean.Input(inp.name, default=inp.default, **kw)
    if inp.type == "COMBO":
        return io.Combo.Input(inp.name, options=inp.choices(HOST), default=inp.default, **kw)
    return _socket_type(inp.type).Input(inp.name, **kw)


def comfy_node(spec) -> type:
    """A V3 io.ComfyNode class for a NodeSpec."""

    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
            description=spec.description, is_output_node=spec.output_node,
            inputs=[_input(i) for i in spec.inputs],
            outputs=[_socket_type(o.type).Output(display_name=o.name, tooltip=o.tooltip) for o in spec.outputs],
        )

    def execute(cls, **inputs):
        res = result(spec.execute(HOST, **inputs))
        return io.NodeOutput(*res.outputs, ui=ui.PreviewText(res.text) if res.text else None)

    return type(spec.node_id, (io.ComfyNode,), {
        "define_schema": classmethod(define_schema), "execute": classmethod(execute), "__doc__": spec.description})


class WuerstchenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [comfy_node(spec) for spec in ALL_NODES]


register_model_folder()
