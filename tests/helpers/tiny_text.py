"""Tiny random CLIP text towers for tests: the real 49,408-token vocabulary (so the shipped tokenizer
works), hidden 128 with 2 heads of 64 (so the head count is inferable like a public tower's, and a
tiny tower loads without a config.json), 2 layers."""

import torch
import transformers

from wuerstchen_core.text import TextEncoder, load_tokenizer


def tiny_clip_text_config(**overrides) -> transformers.CLIPTextConfig:
    values = dict(vocab_size=49408, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return transformers.CLIPTextConfig(**(values | overrides))


def tiny_text_model(seed: int = 0, **overrides) -> transformers.CLIPTextModel:
    """Randomly initialised eval-mode CLIPTextModel; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPTextModel(tiny_clip_text_config(**overrides))
    return model.eval().requires_grad_(False)


def tiny_text_encoder(seed: int = 0, **overrides) -> TextEncoder:
    return TextEncoder(tiny_text_model(seed, **overrides), load_tokenizer())
