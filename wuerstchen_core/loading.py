"""Read weight files safely, tell what they hold, convert the original (dome272) key layout, and
build ready models without a random init.

Supported inputs for every component: a diffusers repo folder (warp-ai/wuerstchen-prior:
prior/ text_encoder/ tokenizer/; warp-ai/wuerstchen: decoder/ vqgan/ text_encoder/ tokenizer/),
a component folder (config.json + weights, possibly sharded with an index json), a single
.safetensors file, and the original torch.save files of dome272/wuerstchen.

Pickles (.pt/.pth/.bin/.ckpt) are only ever read with torch.load(weights_only=True).
"""

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError, UnsafeCheckpointError, WrongComponentError

KINDS = ("prior", "decoder", "vqgan", "effnet", "text")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".sft") + PICKLE_SUFFIXES
FORMAT_VERSION = "1"  # of the compact files written by convert.py (safetensors metadata)

# what each kind is called, which loader takes it, and the ComfyUI models folder it belongs in
DESCRIPTION = {
    "prior": "a Würstchen v2 Stage C prior",
    "decoder": "a Würstchen v2 Stage B decoder",
    "vqgan": "a Würstchen v2 Stage A VQGAN",
    "effnet": "a Würstchen v2 EfficientNet encoder",
    "text": "a CLIP text encoder",
    "stable_cascade_c": "a Stable Cascade (Würstchen v3) Stage C model",
    "stable_cascade_b": "a Stable Cascade (Würstchen v3) Stage B model",
    "stable_cascade_effnet": "the Stable Cascade (Würstchen v3) EfficientNet encoder",
    "sd_checkpoint": "a Stable Diffusion / SDXL checkpoint",
    "sd_unet": "a Stable Diffusion / SDXL UNet",
    "vae": "a Stable Diffusion style VAE",
    "lora": "a LoRA",
    "unknown": "not a recognised model",
}
LOADER = {
    "prior": "the Stage C prior loader",
    "decoder": "the Stage B decoder loader",
    "vqgan": "the Stage A VQGAN loader",
    "effnet": "the EfficientNet encoder loader",
    "text": "the text encoder loader",
}
FOLDER = {"prior": "models/wuerstchen", "decoder": "models/wuerstchen", "vqgan": "models/wuerstchen",
          "effnet": "models/wuerstchen", "text": "models/text_encoders"}
_CASCADE = "this pack runs only Würstchen v2, so use ComfyUI's built-in Stable Cascade nodes for it"
ADVICE = {
    "stable_cascade_c": _CASCADE,
    "stable_cascade_b": _CASCADE,
    "stable_cascade_effnet": _CASCADE,
    "sd_checkpoint": "load it with ComfyUI's checkpoint loader",
    "sd_unet": "load it with ComfyUI's UNet loader",
    "vae": "load it with ComfyUI's VAE loader",
    "lora": "this pack does not apply LoRAs",
}

# where each kind lives in a diffusers repo folder (generator/, efficient_net/: old hub revisions)
SUBFOLDERS = {"prior": ("prior",), "decoder": ("decoder", "generator"), "vqgan": ("vqgan",),
              "effnet": ("efficient_net",), "text": ("text_encoder",)}
REPO_HINT = {
    "prior": "the Stage C prior is in warp-ai/wuerstchen-prior (prior/)",
    "decoder": "the Stage B decoder is in warp-ai/wuerstchen (decoder/)",
    "vqgan": "the Stage A VQGAN is in warp-ai/wuerstchen (vqgan/)",
    "effnet": "the EfficientNet encoder ships only in dome272/wuerstchen's model_v2_stage_b.pt (effnet_state_dict)",
    "text": "the text encoders are in text_encoder/ of warp-ai/wuerstchen-prior (bigG) and warp-ai/wuerstchen (H)",
}
# top-level dict keys of the original torch.save files, in order of preference
PT_KEYS = {"prior": ("ema_state_dict", "state_dict"), "decoder": ("state_dict", "ema_state_dict"),
           "vqgan": ("state_dict",), "effnet": ("effnet_state_dict",), "text": ("state_dict",)}
ALL_PT_KEYS = ("ema_state_dict", "state_dict", "effnet_state_dict", "model", "module")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


@dataclass(frozen=True)
class Identity:
    """What a state dict holds: a KINDS entry or a foreign kind (see DESCRIPTION)."""

    kind: str
    original: bool = False  # dome272 key layout (packed attention / codebook): needs convert_original_state_dict
    tower: str | None = None  # "bigG" / "H" for the public text towers

    @property
    def description(self) -> str:
        if self.kind == "text" and self.tower:
            return f"a CLIP ViT-{self.tower} text encoder"
        return DESCRIPTION[self.kind]


@dataclass(frozen=True)
class ResolvedSource:
    """The files that make up one component of a user-given path."""

    kind: str
    name: str  # what messages call it
    files: tuple[Path, ...]  # weight files (shards in index order)
    config: dict | None = None  # the component folder's config.json
    pt_keys: tuple[str, ...] = ()  # top-level keys to try, in order, when a file is an original torch.save dict
    tokenizer: Path | None = None  # text: the folder holding tokenizer files (None: the shipped BPE)


# ---------------------------------------------------------------------------------------------
# reading files


def as_dtype(dtype) -> torch.dtype | None:
    """torch dtype from a dtype or one of "fp32"/"fp16"/"bf16" (None stays None)."""
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise CheckpointError(f"Load dtype '{dtype}' is not supported; expected one of {', '.join(names)}.")
    return names[dtype]


def _cast(t: torch.Tensor, dtype, device) -> torch.Tensor:
    """Floating tensors to dtype; integer ones (num_batches_tracked) keep theirs."""
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)


def read_state_dict(path, dtype=None, *, device="cpu", keys=ALL_PT_KEYS) -> tuple[dict, dict]:
    """Read one weights file -> (state dict, safetensors metadata), casting tensor by tensor.

    A torch.save file holding a dict of state dicts (the original checkpoints) gives the first of
    `keys` that is present. Prefixes from DDP / torch.compile are stripped.
    """
    path, dtype = Path(path), as_dtype(dtype)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; expected a weights file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes); the download or copy did not finish.")
    if path.suffix in PICKLE_SUFFIXES:
        sd, meta = _read_pickle(path, dtype, device, keys), {}
    else:
        sd, meta = _read_safetensors(path, dtype, device)
    if not sd:
        raise CheckpointError(f"{path.name} holds no tensors; expected a model state dict.")
    return strip_prefixes(sd), meta


def _read_safetensors(path, dtype, device):
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            return {k: _cast(f.get_tensor(k), dtype, device) for k in f.keys()}, meta
    except SafetensorError as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path.name} is not a readable safetensors file ({e}); it is truncated or corrupt.")


def _torch_load(path: Path):
    """torch.load with weights_only=True (memory-mapped when the file allows): tensors and plain
    containers only, never code."""
    try:
        # mmap needs the zip format of torch >= 1.6; older files are read into memory
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # a rejected zip payload or GLOBAL is a refusal; other bytes that fail to unpickle are corruption
        if not (zipfile.is_zipfile(path) or "GLOBAL" in str(e)):
            raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({(str(e).splitlines() or [type(e).__name__])[0]}).") from None
        raise UnsafeCheckpointError(
            f"{path.name} is a pickle that contains code or objects other than tensors, so it was not loaded; "
            "use a .safetensors file or a plain state dict saved with torch.save."
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({(str(e).splitlines() or [type(e).__name__])[0]}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}; expected a dict of tensors.")
    return obj


def _state_dicts(obj: dict) -> dict:
    """The state dicts in a torch.load result: {"": obj} for a plain one, else {top-level key: dict}."""
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"": obj}
    return {k: obj[k] for k in ALL_PT_KEYS if isinstance(obj.get(k), dict)}


def _read_pickle(path, dtype, device, keys):
    sds = _state_dicts(_torch_load(path))
    # the wanted key, else any state dict, so that identification can say what the file is
    key = next((k for k in ("", *keys, *ALL_PT_KEYS) if k in sds), None)
    if key is None:
        raise CheckpointError(f"{path.name} holds no state dict; expected tensors or one of {', '.join(ALL_PT_KEYS)}.")
    return {k: _cast(v, dtype, device) for k, v in sds[key].items() if isinstance(v, torch.Tensor)}


def strip_prefixes(sd: dict) -> dict:
    """Drop leading 'module.' / '_orig_mod.' (DDP, torch.compile) from every key."""
    out = {}
    for k, v in sd.items():
        while k.startswith(STRIP_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _some(names, n=5) -> str:
    """The first n names for a one-line message; control characters (a damaged file's keys) escaped."""
    names = list(names)
    shown = [str(k).encode("unicode_escape").decode("ascii") if not str(k).isprintable() else str(k)
             for k in names[:n]]
    return ", ".join(shown) + (f", … ({len(names)} in all)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# finding the files of a component


def resolve_component(path, kind: str) -> ResolvedSource:
    """The weight files (and config / tokenizer) of component `kind` in a user-given path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; expected a weights file or a model folder.")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return ResolvedSource(kind, p.name, _shards(p), pt_keys=PT_KEYS[kind])
        if p.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{p.name} is not a weights file; expected {', '.join(WEIGHT_SUFFIXES)}.")
        return ResolvedSource(kind, p.name, (p,), pt_keys=PT_KEYS[kind])
    if _is_component_folder(p):
        return _component_folder(p, kind, p.name)
    sub = next((p / s for s in SUBFOLDERS[kind] if (p / s).is_dir()), None)
    if sub is None:
        present = [s + "/" for ks in SUBFOLDERS.values() for s in ks if (p / s).is_dir()]
        if present or (p / "model_index.json").is_file():
            raise WrongComponentError(
                f"{p.name} is a diffusers repo folder with {', '.join(present) or 'no model subfolders'} but no "
                f"{SUBFOLDERS[kind][0]}/ for {LOADER[kind]}; {REPO_HINT[kind]}."
            )
        raise CheckpointError(
            f"{p.name} is a folder without weights; expected config.json with diffusion_pytorch_model.safetensors or "
            f"model.safetensors (or .bin), or a diffusers repo folder with {SUBFOLDERS[kind][0]}/."
        )
    src = _component_folder(sub, kind, f"{p.name}/{sub.name}")
    if kind == "text" and src.tokenizer is None and _has_tokenizer(p / "tokenizer"):
        src = ResolvedSource(kind, src.name, src.files, src.config, src.pt_keys, p / "tokenizer")
    return src


def _is_component_folder(p: Path) -> bool:
    """A folder with one model's weights (not a diffusers repo with per-component subfolders)."""
    return not (p / "model_index.json").is_file() and ((p / "config.json").is_file() or bool(_weight_files(p)))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _weight_files(folder: Path) -> tuple[Path, ...]:
    """The weights of a component folder: a known name, its sharded index, or the only weights file."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return (folder / name,)
        if (folder / f"{name}.index.json").is_file():
            return _shards(folder / f"{name}.index.json")
    for suffixes in ((".safetensors", ".sft"), PICKLE_SUFFIXES):
        found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in suffixes)
        if len(found) == 1:
            return tuple(found)
        if found:
            raise CheckpointError(
                f"{folder.name} holds several weight files ({_some(f.name for f in found)}); expected one, "
                "or diffusion_pytorch_model.safetensors / model.safetensors."
            )
    return ()


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = tuple(index.parent / f for f in dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index.name} is not a valid shard index; expected JSON with a 'weight_map'.") from None
    if missing := [f.name for f in files if not f.is_file()]:
        raise CheckpointError(f"{index.name} lists shards that are missing: {_some(missing)}.")
    return files


def _component_folder(folder: Path, kind: str, name: str) -> ResolvedSource:
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{name} has no weights; expected diffusion_pytorch_model.safetensors, model.safetensors or a .bin/.pt file."
        )
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{name}/config.json is not valid JSON ({e}).") from None
    tokenizer = folder if kind == "text" and _has_tokenizer(folder) else None
    return ResolvedSource(kind, name, files, config, PT_KEYS[kind], tokenizer)


def read_source(src: ResolvedSource, dtype=None, device="cpu") -> tuple[dict, dict]:
    """All tensors of a resolved source (shards merged) and the first file's metadata."""
    sd, meta = {}, None
    for f in src.files:
        part, m = read_state_dict(f, dtype, device=device, keys=src.pt_keys)
        sd.update(part)
        meta = m if meta is None else meta
    return sd, meta or {}


# ---------------------------------------------------------------------------------------------
# identification and key conversion


def identify(sd: dict, metadata: dict | None = None) -> Identity:
    """Tell what a state dict holds from its key names (and shapes, for text towers)."""
    if metadata and metadata.get("wuerstchen.component") in KINDS:
        return Identity(metadata["wuerstchen.component"], tower=metadata.get("wuerstchen.tower"))
    keys = set(sd)
    has = keys.__contains__

    def starts(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    def ends(*suffixes):
        return any(k.endswith(suffixes) for k in keys)

    if any("lora_" in k or ".lora." in k for k in keys):
        return Identity("lora")
    if starts("model.diffusion_model.", "first_stage_model."):
        return Identity("sd_checkpoint")
    if ends("token_embedding.weight") and any("encoder.layers." in k or "transformer.resblocks." in k for k in keys):
        width = next(v.shape[-1] for k, v in sd.items() if k.endswith("token_embedding.weight"))
        return Identity("text", tower={1280: "bigG", 1024: "H"}.get(width))
    if has("clip_txt_mapper.weight") or has("clip_txt_pooled_mapper.weight") or has("clip_img_mapper.weight"):
        return Identity("stable_cascade_c")
    if has("effnet_mapper.0.weight") or has("pixels_mapper.0.weight"):
        return Identity("stable_cascade_b")
    packed = ends(".attn.in_proj_weight")
    if has("cond_mapper.0.weight") and has("projection.weight"):
        return Identity("prior", original=packed)
    if has("clip_mapper.weight") and has("embedding.1.weight") and has("clf.1.weight"):
        return Identity("decoder", original=packed)
    if has("in_block.1.weight") and (has("vquantizer.embedding.weight") or has("vquantizer.codebook.weight")):
        return Identity("vqgan", original=has("vquantizer.codebook.weight"))
    if has("mapper.0.weight") and starts("backbone."):
        return Identity("effnet" if has("mapper.1.weight") else "stable_cascade_effnet")
    if starts("encoder.conv_in.", "decoder.conv_in.") and (starts("quant_conv.", "post_quant_conv.") or starts("decoder.conv_out.")):
        return Identity("vae")
    if (has("conv_in.weight") and starts("time_embedding.")) or (has("input_blocks.0.0.weight") and starts("time_embed.")):
        return Identity("sd_unet")
    return Identity("unknown")


def identify_path(path) -> list[Identity]:
    """What a file or folder holds, from names, shapes and safetensors headers only (no tensor
    data is read): one Identity per subfolder of a repo, per state dict of an original file."""
    p = Path(path).expanduser()
    if p.is_dir() and not _is_component_folder(p):
        subs = [p / s for kind in KINDS for s in SUBFOLDERS[kind] if (p / s).is_dir()]
        if not subs:
            resolve_component(p, "prior")  # raises its clear error about the folder
        return [i for sub in subs for i in identify_path(sub)]
    merged, meta = {}, {}
    for f in resolve_component(p, "prior").files:  # the file list does not depend on the kind
        if f.suffix in PICKLE_SUFFIXES:
            parts = _state_dicts(_torch_load(f))
        else:
            try:
                with safe_open(f, framework="pt") as h:
                    meta = meta or h.metadata() or {}
                    parts = {"": {k: torch.empty(h.get_slice(k).get_shape(), device="meta") for k in h.keys()}}
            except SafetensorError as e:
                raise _unreadable(f, e) from None
        for key, sd in parts.items():
            merged.setdefault(key, {}).update(sd)
    found = {}
    for sd in merged.values():
        ident = identify(strip_prefixes(sd), meta)
        found.setdefault(ident.kind, ident)
    return list(found.values())


def expect(ident: Identity, kind: str, name: str, sd: dict | None = None) -> None:
    """Raise WrongComponentError unless `ident` is what `kind`'s loader needs (text towers are
    checked by wuerstchen_core.text)."""
    if ident.kind == kind:
        return
    if ident.kind == "unknown":
        raise WrongComponentError(
            f"{name} is not a file this pack recognises (first keys: {_some(sd or [], 3)}); expected {DESCRIPTION[kind]} "
            "in diffusers or original layout."
        )
    if ident.kind in KINDS:
        raise WrongComponentError(
            f"{name} is {ident.description}, but {LOADER[kind]} was used; load it with {LOADER[ident.kind]} "
            f"({FOLDER[ident.kind]})."
        )
    raise WrongComponentError(f"{name} is {ident.description}, not {DESCRIPTION[kind]}; {ADVICE[ident.kind]}.")


ATTENTION_KINDS = ("prior", "decoder")  # the kinds whose original files pack q/k/v into one in_proj
_IN_PROJ = re.compile(r"(.*\.)attn\.in_proj_(weight|bias)")
_OUT_PROJ = re.compile(r"(.*\.)attn\.out_proj\.(weight|bias)")
_QKV = re.compile(r"(.*\.)to_([qkv])\.(weight|bias)")
_TO_OUT = re.compile(r"(.*\.)to_out\.0\.(weight|bias)")


def convert_original_state_dict(sd: dict, kind: str) -> dict:
    """dome272/Wuerstchen key layout -> diffusers names: the packed [q; k; v] in_proj is split into
    to_q/to_k/to_v, out_proj becomes to_out.0, the VQ codebook becomes embedding. Other keys are kept."""
    out = {}
    for k, v in sd.items():
        if kind in ATTENTION_KINDS and (m := _IN_PROJ.fullmatch(k)):
            for n, t in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m[1]}to_{n}.{m[2]}"] = t.clone()  # own storage: safetensors refuses shared tensors
        elif kind in ATTENTION_KINDS and (m := _OUT_PROJ.fullmatch(k)):
            out[f"{m[1]}to_out.0.{m[2]}"] = v
        elif kind == "vqgan" and k == "vquantizer.codebook.weight":
            out["vquantizer.embedding.weight"] = v
        else:
            out[k] = v
    return out


def to_original_state_dict(sd: dict, kind: str) -> dict:
    """Inverse of convert_original_state_dict (packs q/k/v back exactly)."""
    out = {}
    for k, v in sd.items():
        if kind in ATTENTION_KINDS and (m := _QKV.fullmatch(k)):
            if m[2] == "q":
                out[f"{m[1]}attn.in_proj_{m[3]}"] = torch.cat([sd[f"{m[1]}to_{n}.{m[3]}"] for n in "qkv"], dim=0)
        elif kind in ATTENTION_KINDS and (m := _TO_OUT.fullmatch(k)):
            out[f"{m[1]}attn.out_proj.{m[2]}"] = v
        elif kind == "vqgan" and k == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# building models


def model_classes(kind: str):
    """(Config class, Module class) for a Würstchen kind; imported lazily."""
    if kind == "prior":
        from .models.prior import PriorConfig, WuerstchenPrior
        return PriorConfig, WuerstchenPrior
    if kind == "decoder":
        from .models.decoder import DecoderConfig, WuerstchenDecoder
        return DecoderConfig, WuerstchenDecoder
    if kind == "vqgan":
        from .models.vqgan import PaellaVQGAN, VQGANConfig
        return VQGANConfig, PaellaVQGAN
    from .models.effnet import EfficientNetEncoder, EffNetConfig
    return EffNetConfig, EfficientNetEncoder


def stored_config(src: ResolvedSource, metadata: dict) -> dict | None:
    """The config saved with the weights: the folder's config.json, else a converted file's metadata."""
    if src.config is not None:
        return src.config
    return json.loads(metadata["wuerstchen.config"]) if "wuerstchen.config" in metadata else None


def infer_config(kind: str, sd: dict, stored: dict | None = None, name: str = ""):
    """The architecture config: from a stored config (diffusers names), else from the tensor names
    and shapes. The effnet's stage table has no diffusers form; its weights define it completely."""
    cfg_cls, _ = model_classes(kind)
    try:
        if stored is not None and hasattr(cfg_cls, "from_diffusers"):
            return cfg_cls.from_diffusers(stored)
        return cfg_cls.from_state_dict(sd)
    except CheckpointError as e:
        raise type(e)(f"{name}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{name}: the stored {kind} config is invalid ({e}).") from None


def check_keys(expected: dict, sd: dict, name: str, what: str) -> None:
    """Raise CheckpointError listing missing / unexpected keys and wrong shapes (never a partial load)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {list(sd[k].shape)} vs {list(expected[k].shape)}" for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = [f"{len(v)} {label} ({_some(v)})" for v, label in
                ((missing, "missing keys"), (unexpected, "unexpected keys"), (wrong, "wrong shapes, file vs model"))
                if v]
    if problems:
        raise CheckpointError(f"{name} does not match {what}: {'; '.join(problems)}.")


def build_model(module_cls, cfg, sd: dict, name: str = "", what: str = "the model") -> nn.Module:
    """Build `module_cls(cfg)` on the meta device and take the tensors of `sd` as its weights
    (no random init, no second copy). Returns the model in eval mode."""
    with torch.device("meta"):
        model = module_cls(cfg)
    check_keys(model.state_dict(), sd, name, what)
    model.load_state_dict(sd, strict=True, assign=True)
    if left := [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]:
        raise RuntimeError(f"{module_cls.__name__} has tensors outside its state dict that stay on meta: {_some(left)}")
    return model.eval().requires_grad_(False)


def load_state_dict_for(path, kind: str, dtype=torch.float32, device="cpu"):
    """Resolve, read, identify (raising for a wrong file) and convert to diffusers keys.
    Returns (state dict, ResolvedSource, metadata)."""
    src = resolve_component(path, kind)
    sd, meta = read_source(src, dtype, device)
    ident = identify(sd, meta)
    expect(ident, kind, src.name, sd)
    if ident.original:
        sd = convert_original_state_dict(sd, kind)
    return sd, src, meta


def _load(path, kind, dtype, device):
    sd, src, meta = load_state_dict_for(path, kind, as_dtype(dtype), device)
    cfg = infer_config(kind, sd, stored_config(src, meta), src.name)
    return build_model(model_classes(kind)[1], cfg, sd, src.name, f"{DESCRIPTION[kind]} with {cfg}")


def load_prior(path, dtype=torch.float32, device="cpu"):
    """Stage C prior (WuerstchenPrior) from any supported file or folder, in eval mode."""
    return _load(path, "prior", dtype, device)


def load_decoder(path, dtype=torch.float32, device="cpu", fold_effnet=True):
    """Stage B decoder (WuerstchenDecoder), in eval mode. fold_effnet: in its sampling form (0.38 GiB
    less at public size, see WuerstchenDecoder.fold_effnet); False keeps the checkpoint's weights."""
    decoder = _load(path, "decoder", dtype, device)
    return decoder.fold_effnet() if fold_effnet else decoder


def load_vqgan(path, dtype=torch.float32, device="cpu"):
    """Stage A VQGAN (PaellaVQGAN), in eval mode."""
    return _load(path, "vqgan", dtype, device)


def load_effnet(path, dtype=torch.float32, device="cpu"):
    """EfficientNet encoder (from model_v2_stage_b.pt's effnet_state_dict or a converted file)."""
    return _load(path, "effnet", dtype, device)


def load_text_encoder(path, tower: str | None = None, dtype=torch.float32, device="cpu"):
    """CLIP text encoder + tokenizer (TextEncoder). A repo folder gives its text_encoder/ and
    tokenizer/; a single file gets the shipped BPE tokenizer. tower "bigG"/"H" rejects the other."""
    from .text import build_text_encoder  # transformers is only imported when text is needed

    sd, src, meta = load_state_dict_for(path, "text", dtype, device)
    return build_text_encoder(sd, stored_config(src, meta), as_dtype(dtype) or torch.float32, expected=tower,
                              tokenizer_folder=src.tokenizer, source_name=src.name)
