"""Convert any supported Würstchen v2 input (repo folder, component folder, .safetensors, original
.pt) into one compact .safetensors per component, in diffusers key layout and the chosen dtype.

The files carry safetensors metadata ("wuerstchen.component", "wuerstchen.config",
"wuerstchen.format_version", and "wuerstchen.tower" for text encoders), which the loaders use to
identify them cheaply; their keys are still validated on load.
"""

import dataclasses
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from .errors import CheckpointError
from .loading import (
    DESCRIPTION,
    FORMAT_VERSION,
    KINDS,
    as_dtype,
    build_model,
    identify_path,
    infer_config,
    load_state_dict_for,
    model_classes,
    stored_config,
)

DTYPES = ("fp16", "bf16", "fp32")


def output_name(kind: str, dtype: str, tower: str | None = None) -> str:
    """wuerstchen_v2_prior_fp16.safetensors, wuerstchen_v2_text_bigG_fp16.safetensors, ..."""
    return f"wuerstchen_v2_{kind}_{tower or 'custom'}_{dtype}.safetensors" if kind == "text" else \
        f"wuerstchen_v2_{kind}_{dtype}.safetensors"


def convert(input_path, output, kinds=None, dtype: str = "fp16", overwrite: bool = False) -> list[Path]:
    """Write one .safetensors per component found in `input_path` (or only `kinds`) into the folder
    `output`, or into the file `output` when it ends in .safetensors and there is one component.
    Returns the written paths. Existing outputs are kept unless overwrite=True."""
    if dtype not in DTYPES:
        raise CheckpointError(f"Conversion dtype '{dtype}' is not supported; expected one of {', '.join(DTYPES)}.")
    found = {i.kind: i for i in identify_path(input_path)}
    wanted = list(kinds) if kinds is not None else [k for k in KINDS if k in found]
    if not wanted:
        raise CheckpointError(f"{Path(input_path).name} holds no Würstchen v2 component "
                              f"({', '.join(i.description for i in found.values()) or 'no tensors'}); expected a prior, "
                              "decoder, VQGAN, EfficientNet or text encoder to convert.")
    if unknown := [k for k in wanted if k not in KINDS]:
        raise ValueError(f"kinds must be among {KINDS}, got {unknown}")
    if missing := [k for k in wanted if k not in found]:
        holds = ", ".join(i.description for i in found.values())
        missing = ", ".join(DESCRIPTION[k].removeprefix("a ") for k in missing)
        raise CheckpointError(f"{Path(input_path).name} holds {holds} but no {missing} to convert.")
    output = Path(output).expanduser()
    if output.suffix == ".safetensors":
        if len(wanted) != 1:
            raise CheckpointError(
                f"{Path(input_path).name} holds {len(wanted)} components ({', '.join(wanted)}); give an output folder, not {output.name}."
            )
        targets = {wanted[0]: output}
    else:
        targets = {k: output / output_name(k, dtype, found[k].tower) for k in wanted}
    if not overwrite and (existing := [str(t) for t in targets.values() if t.exists()]):
        raise CheckpointError(f"{', '.join(existing)} already exists; pass overwrite=True (--overwrite) to replace it.")
    for kind, target in targets.items():
        sd, meta = _component(input_path, kind, dtype, found[kind].tower)
        _save_atomic(sd, meta, target)
    return list(targets.values())


def _component(path, kind: str, dtype: str, tower: str | None) -> tuple[dict, dict]:
    """The validated state dict (cast to dtype) of one component and its metadata."""
    sd, src, meta = load_state_dict_for(path, kind, as_dtype(dtype))
    info = {"wuerstchen.component": kind, "wuerstchen.format_version": FORMAT_VERSION}
    if kind == "text":
        from .text import build_text_encoder, normalize_text_state_dict

        sd = normalize_text_state_dict(sd, src.name)
        encoder = build_text_encoder(sd, stored_config(src, meta), as_dtype(dtype), expected=tower, source_name=src.name)  # validates
        sd = {"text_model." + k: v for k, v in sd.items()}  # transformers CLIPTextModel layout
        info["wuerstchen.config"] = json.dumps(encoder.model.config.to_dict())
        if tower:
            info["wuerstchen.tower"] = tower
    else:
        cfg = infer_config(kind, sd, stored_config(src, meta), src.name)
        build_model(model_classes(kind)[1], cfg, sd, src.name, f"{DESCRIPTION[kind]} with {cfg}")  # validates
        info["wuerstchen.config"] = json.dumps(dataclasses.asdict(cfg))
    return sd, info


def _save_atomic(sd: dict, metadata: dict, target: Path) -> None:
    """Write to a temporary file next to `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
