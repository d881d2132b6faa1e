"""CLIP text towers through `transformers.CLIPTextModel`, and the CLIP BPE tokenizer.

Stage C reads CLIP ViT-bigG/14 (hidden 1280, 32 layers), Stage B CLIP ViT-H/14 (1024, 24). Both
use `last_hidden_state` (after the final LayerNorm) of all 77 tokens, computed with the tokenizer's
attention mask; the unconditional embedding is the encoded empty string, not zeros.

Accepted weight layouts (see `normalize_text_state_dict`):
- transformers `CLIPTextModel` / `CLIPTextModelWithProjection` / `CLIPModel` keys
  (`[prefix]text_model.embeddings...`), with or without `text_model.` and behind any prefix
  (`text_encoder.`, `clip_g.transformer.`, `conditioner.embedders.0.transformer.`, ...);
- OpenCLIP's native text tower (`[prefix]transformer.resblocks.N.attn.in_proj_weight`, e.g. SDXL's
  `conditioner.embedders.1.model.`), whose packed q/k/v projections are split.
"""

import re
from pathlib import Path

import torch
import transformers
from torch import Tensor

from .errors import CheckpointError, WrongComponentError

MAX_LENGTH = 77
EOS_TOKEN = "<|endoftext|>"
SHIPPED_BPE = Path(__file__).parent / "data" / "clip-bpe"

# The towers Würstchen uses, by slot: (hidden, layers).
TOWERS = {"bigG": (1280, 32), "H": (1024, 24)}
SLOTS = {"bigG": "the Stage C (prior) text encoder, CLIP ViT-bigG/14 (hidden 1280, 32 layers)",
         "H": "the Stage B (decoder) text encoder, CLIP ViT-H/14 (hidden 1024, 24 layers)"}
# Widths of public CLIP text towers. Only these identify a tower; other widths (the tiny test
# towers) pass any `expected` check, so tests can route them through the real loaders.
PUBLIC_WIDTHS = (512, 768, 1024, 1280)
# OpenAI's own CLIP text towers (B: 512, L: 768) use quick_gelu; LAION's H and bigG use exact gelu.
QUICK_GELU_WIDTHS = (512, 768)
HEAD_DIM = 64  # every public CLIP text tower


def load_tokenizer(folder: str | Path | None = None):
    """CLIP tokenizer from `folder` when it holds one (vocab.json + merges.txt, or tokenizer.json),
    else from the shipped BPE files. Lower-case, 77 tokens, pad = eos = `<|endoftext|>`."""
    path = Path(folder) if folder is not None else None
    has_own = path is not None and ((path / "tokenizer.json").is_file() or
                                    ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()))
    # CLIPTokenizerFast is the tokenizers-backed class in transformers 4.x and an alias of it in 5.x.
    return transformers.CLIPTokenizerFast.from_pretrained(
        str(path if has_own else SHIPPED_BPE), local_files_only=True,
        model_max_length=MAX_LENGTH, pad_token=EOS_TOKEN)


class TextEncoder:
    """A CLIP text tower plus its tokenizer: prompts -> last_hidden_state [B, 77, hidden]."""

    def __init__(self, model: transformers.CLIPTextModel, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        """Where the forward runs: the final LayerNorm's device (it is never streamed, see `layers`)."""
        return self._tower.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self) -> list[torch.nn.Module]:
        """The parts that run once each per forward, in order (token embedding, transformer layers):
        what low-VRAM mode uploads one at a time (performance.on_device's `stream`)."""
        return [self._tower.embeddings, *self._tower.encoder.layers]

    @property
    def _tower(self) -> torch.nn.Module:  # transformers 4 wraps the tower in `text_model`, 5 does not
        return getattr(self.model, "text_model", self.model)

    @torch.inference_mode()
    def encode(self, prompts: list[str] | str) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH,
                                truncation=True, return_tensors="pt")
        out = self.model(input_ids=tokens["input_ids"].to(self.device),
                         attention_mask=tokens["attention_mask"].to(self.device))
        return out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# State dicts

_HF_ANCHOR = "embeddings.token_embedding.weight"
_OPENCLIP_ANCHOR = "token_embedding.weight"
# Keys a CLIP text checkpoint may carry that CLIPTextModel does not use.
_UNUSED = {"text_projection", "text_projection.weight", "logit_scale", "attn_mask", "embeddings.position_ids"}
_UNUSED_PREFIXES = ("visual.", "vision_model.", "visual_projection.")

_OPENCLIP_RENAMES = [  # OpenCLIP name -> CLIPTextModel name
    (r"^token_embedding\.weight$", "embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_final\.", "final_layer_norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
]
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def normalize_text_state_dict(sd: dict[str, Tensor], source_name: str = "text encoder") -> dict[str, Tensor]:
    """Return the text tower of `sd` with CLIPTextModel key names (`embeddings.*`, `encoder.layers.N.*`,
    `final_layer_norm.*`, no `text_model.` prefix), dropping projection, logit scale and position ids."""
    towers = {}
    for key in sd:
        if key.endswith(_HF_ANCHOR):
            towers[key[:-len(_HF_ANCHOR)]] = "transformers"
        elif key.endswith(_OPENCLIP_ANCHOR):
            towers[key[:-len(_OPENCLIP_ANCHOR)]] = "openclip"
    if not towers:
        raise WrongComponentError(
            f"{source_name} does not hold a CLIP text encoder (no '...token_embedding.weight' key among "
            f"its {len(sd)} tensors); expected a transformers CLIPTextModel or OpenCLIP text tower.")
    if len(towers) > 1:
        found = ", ".join(f"'{p}'" for p in sorted(towers))
        raise CheckpointError(f"{source_name} holds {len(towers)} CLIP text towers (under {found}); "
                              "expected exactly one, so save the one this slot needs on its own.")
    [(prefix, layout)] = towers.items()
    tower = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    tower = {k: v for k, v in tower.items() if k not in _UNUSED and not k.startswith(_UNUSED_PREFIXES)}
    return _from_openclip(tower) if layout == "openclip" else tower


def _from_openclip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        if m := _IN_PROJ.match(key):  # packed [q; k; v] along dim 0
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        for pattern, repl in _OPENCLIP_RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value  # an unknown key stays as is and is reported by the strict load
    return out


def _layer_count(sd: dict[str, Tensor]) -> int:
    return len({m[1] for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})


def text_config_from_state_dict(sd: dict[str, Tensor], config_dict: dict | None = None,
                                source_name: str = "text encoder") -> transformers.CLIPTextConfig:
    """CLIPTextConfig for a normalized state dict: from `config_dict` (a CLIPTextModel or CLIPModel
    config.json) when given, cross-checked against the weights; else inferred from shapes.

    Inference cannot see the activation or head count: heads = hidden / 64 (true for every public CLIP
    text tower); hidden_act = "quick_gelu" for widths 512/768 (OpenAI's CLIP-B/L, e.g. SD 1.x and
    SDXL's clip_l), else "gelu" (LAION's H and bigG, which Würstchen uses); layer_norm_eps = 1e-5."""
    try:
        token_embedding = sd["embeddings.token_embedding.weight"]
        vocab, hidden = token_embedding.shape
        max_positions = sd["embeddings.position_embedding.weight"].shape[0]
        intermediate = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source_name} is an incomplete CLIP text encoder: tensor {e} is missing.") from None
    layers = _layer_count(sd)
    inferred = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    intermediate_size=intermediate, max_position_embeddings=max_positions)
    if config_dict is not None:
        config_dict = config_dict.get("text_config", config_dict)  # a full CLIPModel config
        config = transformers.CLIPTextConfig.from_dict(config_dict)
        for name, value in inferred.items():
            if getattr(config, name) != value:
                raise CheckpointError(f"{source_name}: its config.json says {name}={getattr(config, name)} "
                                      f"but its weights have {name}={value}.")
        return config
    if hidden % HEAD_DIM:
        raise CheckpointError(f"{source_name}: cannot infer the head count of a CLIP text tower with hidden "
                              f"size {hidden} (not a multiple of {HEAD_DIM}); expected a config.json beside it.")
    return transformers.CLIPTextConfig(
        **inferred, num_attention_heads=hidden // HEAD_DIM,
        hidden_act="quick_gelu" if hidden in QUICK_GELU_WIDTHS else "gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def describe_tower(hidden: int, layers: int) -> str:
    """Human name of a CLIP text tower from its width and depth."""
    names = {(1280, 32): "CLIP ViT-bigG/14 text tower (hidden 1280, 32 layers)",
             (1024, 24): "CLIP ViT-H/14 text tower (hidden 1024, 24 layers)",
             (1024, 23): "23-layer CLIP ViT-H/14 text tower of Stable Diffusion 2, which lacks the last "
                         "layer that Würstchen uses",
             (768, 12): "CLIP ViT-L/14 text tower (hidden 768, 12 layers)",
             (512, 12): "CLIP ViT-B text tower (hidden 512, 12 layers)"}
    return names.get((hidden, layers), f"CLIP text tower with hidden size {hidden} and {layers} layers")


def check_tower(config: transformers.CLIPTextConfig, expected: str | None, source_name: str) -> None:
    """Raise WrongComponentError if a public-size tower is not the one the `expected` slot needs."""
    if expected is None:
        return
    if expected not in TOWERS:
        raise ValueError(f"expected must be one of {sorted(TOWERS)} or None, not {expected!r}")
    found = (config.hidden_size, config.num_hidden_layers)
    if found != TOWERS[expected] and config.hidden_size in PUBLIC_WIDTHS:
        raise WrongComponentError(f"{source_name} is the {describe_tower(*found)}, but this slot needs "
                                  f"{SLOTS[expected]}.")


def build_text_encoder(sd: dict[str, Tensor], config_dict: dict | None = None, dtype: torch.dtype = torch.float32,
                       expected: str | None = None, tokenizer_folder: str | Path | None = None,
                       source_name: str = "text encoder") -> TextEncoder:
    """Build an eval-mode CLIPTextModel in `dtype` on the state dict's device, without a random init."""
    sd = normalize_text_state_dict(sd, source_name)
    config = text_config_from_state_dict(sd, config_dict, source_name)
    check_tower(config, expected, source_name)
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    # transformers 4.x nests the tower under `text_model.`; 5.x does not.
    prefix = "text_model." if hasattr(model, "text_model") else ""
    sd = {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    wanted = set(model.state_dict())
    missing, unexpected = sorted(wanted - set(sd)), sorted(set(sd) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{source_name} does not match a CLIPTextModel: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all).")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches; torch lists one per line after a header
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{source_name} does not match its CLIP text config: {detail}") from None
    # Non-persistent buffers are not in the state dict, so they are still on meta: recreate them.
    device = sd[prefix + "embeddings.token_embedding.weight"].device
    for name, buf in list(model.named_buffers()):
        if name.endswith("position_ids"):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(module, "position_ids", torch.arange(buf.shape[-1], device=device).expand(1, -1))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "unrestored meta tensor"
    model.eval().requires_grad_(False)
    return TextEncoder(model, load_tokenizer(tokenizer_folder))
