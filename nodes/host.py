"""What a node needs from its surroundings, and the plain implementation used outside ComfyUI.

`Host` is the interface: model folders, moving models to the compute device, progress/preview
reporting, interrupt checks and the device results are returned on. `StandaloneHost` serves the
workflow runner and the tests; `comfy_host.ComfyHost` is the ComfyUI implementation.
"""

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from wuerstchen_core import performance
from wuerstchen_core.errors import CheckpointError
from wuerstchen_core.pipeline import compute_param

# Which model folders each loader lists: our own `wuerstchen` folder first, then the standard
# ComfyUI folders where such files already live (ComfyUI maps unet -> diffusion_models, clip -> text_encoders).
MODEL_FOLDERS = {
    "prior": ("wuerstchen", "diffusion_models"),
    "decoder": ("wuerstchen", "diffusion_models"),
    "vqgan": ("wuerstchen", "vae"),
    "effnet": ("wuerstchen", "vae"),
    "text_encoder": ("wuerstchen", "text_encoders"),
}
LEGACY_FOLDERS = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip")}
EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # = folder_paths'
DIFFUSERS_MARKERS = ("config.json", "model_index.json")


@dataclass(eq=False)
class LoadedModel:
    """A loaded component as it travels between nodes (types WUERSTCHEN_PRIOR, ...)."""
    kind: str  # a MODEL_FOLDERS key
    model: Any  # the core object: an nn.Module, or a wuerstchen_core.text.TextEncoder
    module: torch.nn.Module  # what moves between devices
    name: str  # the file name as picked in the loader, for error messages
    tower: str | None = None  # text encoders: "bigG" (Stage C) or "H" (Stage B)
    patcher: Any = None  # ComfyUI's ModelPatcher, when hosted by ComfyUI
    compiled: Any = None  # the fast-mode (torch.compile) forward, made on first use
    graphed: Any = None  # the cuda_graphs option's performance.GraphedNetwork, made on first use

    @property
    def dtype(self) -> torch.dtype:
        return compute_param(self.module).dtype  # not the fp8 storage dtype of Linear weights


def _is_diffusers_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, m)) for m in DIFFUSERS_MARKERS)


def list_models(dirs: list[str]) -> list[str]:
    """Model files (by extension) and diffusers folders (with a config.json) under `dirs`, relative, sorted.
    Files inside a diffusers folder are represented by the folder."""
    names = []
    for base in dirs:
        if not os.path.isdir(base):
            continue
        for root, subdirs, files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            if rel != "." and _is_diffusers_dir(root):
                names.append(rel.replace(os.sep, "/"))
                if os.path.isfile(os.path.join(root, "config.json")):
                    subdirs.clear()  # a component folder: its weight files are not listed separately
                continue
            subdirs.sort()
            names += [os.path.join(rel, f).replace(os.sep, "/").removeprefix("./")
                      for f in files if os.path.splitext(f)[1].lower() in EXTENSIONS]
    return sorted(dict.fromkeys(names))


def resolve_model(dirs: list[str], name: str, what: str) -> str:
    """The full path of `name` inside one of `dirs`; refuses names that leave the model folders."""
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CheckpointError(f"{what} name {name!r} points outside the model folders; expected a name from the list.")
    for base in dirs:
        path = os.path.join(base, *parts)
        abs_base, abs_path = os.path.abspath(base), os.path.abspath(path)  # lexical: symlinked files are fine
        if os.path.commonpath([abs_base, abs_path]) != abs_base:
            raise CheckpointError(f"{what} {name!r} resolves outside its model folder {base}; expected a file inside it.")
        if os.path.exists(path):
            return path
    raise CheckpointError(f"{what} {name!r} was not found in {', '.join(dirs) or 'any model folder'}; "
                          "expected a file or diffusers folder listed there.")


class Host:
    """Interface used by node functions. Subclasses implement the device and reporting parts."""

    def model_dirs(self, kind: str) -> list[str]:
        raise NotImplementedError

    def list_models(self, kind: str) -> list[str]:
        return list_models(self.model_dirs(kind))

    def resolve_model(self, kind: str, name: str, what: str) -> str:
        return resolve_model(self.model_dirs(kind), name, what)

    def weight_dtype(self, kind: str, choice: str) -> torch.dtype | None:
        """The storage dtype for a loader's `weight_dtype` choice ("auto" picks what the device supports)."""
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(choice) or self.auto_dtype(kind)

    def auto_dtype(self, kind: str) -> torch.dtype:
        raise NotImplementedError

    def wrap(self, kind: str, model, module: torch.nn.Module, name: str, tower=None) -> LoadedModel:
        return LoadedModel(kind, model, module, name, tower)

    def fast_model(self, loaded: LoadedModel, device: torch.device) -> torch.nn.Module:
        """The sampler nodes' fast mode: `loaded`'s network compiled once (CUDA graphs on a GPU) and kept
        with it, so later runs of the same size and batch reuse the compiled code."""
        if loaded.compiled is None:
            loaded.compiled = performance.compile_model(loaded.model, cuda_graphs=device.type == "cuda")
        return loaded.compiled

    def graphed_model(self, loaded: LoadedModel) -> torch.nn.Module:
        """The sampler nodes' cuda_graphs option: `loaded`'s network with its steps replayed from CUDA
        graphs, kept with it so later runs of the same size and batch replay the captured graphs."""
        if loaded.graphed is None:
            loaded.graphed = performance.GraphedNetwork(loaded.model)
        return loaded.graphed

    def load(self, *models: LoadedModel, activations: int = 0) -> torch.device:
        """Put `models` (None entries skipped) on the compute device, with room for `activations` more
        bytes (the stage's memory.activation_bytes estimate); returns that device."""
        raise NotImplementedError

    def progress(self, total: int) -> "Progress":
        raise NotImplementedError

    def wants_previews(self) -> bool:
        """Whether samplers should render step previews (they cost a small decode per step)."""
        return True

    def intermediate_device(self) -> torch.device:
        return torch.device("cpu")


class Progress:
    """Per-step reporting; `update` is also an interrupt point."""

    def update(self, step: int, preview=None):  # preview: a PIL image or None
        raise NotImplementedError


class StandaloneHost(Host):
    """Outside ComfyUI: models from `models_dir/<folder>`, one device, progress to stderr (or a callback)."""

    def __init__(self, models_dir: str, device="cpu", input_dir: str | None = None, output_dir: str | None = None,
                 on_progress=None):
        self.models_dir, self.device = models_dir, torch.device(device)
        self.input_dir = input_dir or os.path.join(models_dir, "..", "input")
        self.output_dir = output_dir or os.path.join(models_dir, "..", "output")
        self.previews = on_progress is not None  # the stderr reporter shows no images
        self.on_progress = on_progress or self._stderr_progress  # on_progress(step, total, preview)
        self.label = ""  # the running node, set by the runner

    def model_dirs(self, kind):
        return [os.path.join(self.models_dir, sub)
                for folder in MODEL_FOLDERS[kind] for sub in LEGACY_FOLDERS.get(folder, (folder,))]

    def auto_dtype(self, kind):
        if self.device.type != "cuda" or kind == "effnet":  # BatchNorm-heavy effnet and CPU stay fp32
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def load(self, *models, activations=0):  # one device, nothing else to make room for
        for m in models:
            if m is not None:
                m.module.to(self.device)
        return self.device

    def progress(self, total):
        return _CallbackProgress(total, self.on_progress)

    def wants_previews(self):
        return self.previews

    def _stderr_progress(self, step, total, preview):
        print(f"\r{self.label}: {step}/{total}", end="\n" if step >= total else "", file=sys.stderr, flush=True)


class _CallbackProgress(Progress):
    def __init__(self, total, fn):
        self.total, self.fn = total, fn

    def update(self, step, preview=None):
        self.fn(step, self.total, preview)


