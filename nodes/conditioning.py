"""Text encode node and the checks that turn CONDITIONING back into one text embedding per image."""

import torch

from wuerstchen_core.errors import StageMismatchError

from .spec import TEXT_ENCODER, Input, NodeSpec, Output

STAGE_OF_TOWER = {"bigG": "C", "H": "B"}


def _encode(host, text_encoder, text):
    host.load(text_encoder)
    with torch.inference_mode():
        emb = text_encoder.model.encode([text])  # [1,77,hidden]
    tower = text_encoder.tower
    return ([[emb.to(host.intermediate_device()), {"pooled_output": None, "wuerstchen_tower": tower}]],)


TEXT_ENCODE = NodeSpec(
    "WuerstchenTextEncode",
    "Würstchen Text Encode",
    "Encodes a prompt for Stage C (with the bigG encoder) or Stage B (with the H encoder). "
    "Use one node for the positive and one for the negative prompt.",
    (Input("text_encoder", TEXT_ENCODER, "The text encoder; its tower decides which stage the result is for."),
     Input("text", "STRING", "The prompt. An empty string is the usual negative prompt.", default="", multiline=True)),
    (Output("conditioning", "CONDITIONING", "The prompt's last hidden states, for the matching stage's sampler."),),
    _encode,
)


def text_embedding(cond, tower: str, batch: int, width: int, where: str) -> torch.Tensor:
    """The [batch,77,width] text embedding in `cond`, checked against the stage that consumes it."""
    stage = STAGE_OF_TOWER[tower]
    if not isinstance(cond, list) or not cond or not isinstance(cond[0], (list, tuple)) or len(cond[0]) != 2:
        raise StageMismatchError(f"{where}: expected a CONDITIONING from Würstchen Text Encode, got {type(cond).__name__}.")
    if len(cond) > 1:
        raise StageMismatchError(f"{where}: got {len(cond)} combined conditionings, expected one "
                                 "(Würstchen conditionings cannot be combined or concatenated).")
    emb, extra = cond[0]
    found = extra.get("wuerstchen_tower")
    if found is None:
        raise StageMismatchError(f"{where}: the conditioning does not come from Würstchen Text Encode "
                                 f"(no 'wuerstchen_tower'), expected one encoded with the {tower} text encoder.")
    if found != tower:
        raise StageMismatchError(f"{where}: the conditioning was encoded with the {found} text encoder "
                                 f"(Stage {STAGE_OF_TOWER.get(found, '?')}), expected the {tower} encoder for Stage {stage}.")
    if emb.dim() != 3 or emb.shape[-1] != width:
        raise StageMismatchError(f"{where}: text embedding has shape {list(emb.shape)}, expected [N, 77, {width}] "
                                 f"for this Stage {stage} model.")
    if emb.shape[0] not in (1, batch):
        raise StageMismatchError(f"{where}: conditioning batch is {emb.shape[0]} but the latent batch is {batch}, "
                                 "expected 1 or the same size.")
    return emb.expand(batch, -1, -1)


NODES = (TEXT_ENCODE,)
