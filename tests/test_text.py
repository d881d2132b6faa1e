import re
import shutil

import pytest
import torch
import transformers
from torch import nn

from tests.helpers.tiny_text import tiny_clip_text_config, tiny_text_encoder, tiny_text_model
from wuerstchen_core.errors import CheckpointError, WrongComponentError
from wuerstchen_core.text import (SHIPPED_BPE, TextEncoder, build_text_encoder, check_tower, load_tokenizer,
                                  normalize_text_state_dict, text_config_from_state_dict)

BOS, EOS = 49406, 49407
CHECK_PROMPT = "Real photo of an eagle wearing a white coat"
CHECK_IDS = [BOS, 1532, 1125, 539, 550, 7517, 3309, 320, 1579, 7356, EOS]
PROMPTS = ["a photo of a cat", "", "Real photo of an eagle wearing a white coat"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_text_model(seed=0)


# --- tokenizer -------------------------------------------------------------------------------

def test_shipped_tokenizer_check_vector(tokenizer):
    assert tokenizer(CHECK_PROMPT)["input_ids"] == CHECK_IDS
    assert tokenizer(CHECK_PROMPT.upper())["input_ids"] == CHECK_IDS  # lower-cases
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == EOS and tokenizer.bos_token_id == BOS


def test_tokenizer_from_folder_and_fallback(tmp_path, tokenizer):
    own = tmp_path / "bpe"
    shutil.copytree(SHIPPED_BPE, own)
    assert load_tokenizer(own)(CHECK_PROMPT)["input_ids"] == CHECK_IDS

    # A tokenizer.json-only folder whose config pads with "!" (Stable Diffusion 2 style): pad is forced to eos.
    fast = tmp_path / "fast"
    transformers.CLIPTokenizerFast.from_pretrained(str(own), pad_token="!").save_pretrained(str(fast))
    for name in ("vocab.json", "merges.txt"):
        (fast / name).unlink(missing_ok=True)
    loaded = load_tokenizer(fast)
    assert loaded(CHECK_PROMPT)["input_ids"] == CHECK_IDS
    assert loaded.pad_token_id == EOS and loaded.model_max_length == 77

    (tmp_path / "empty").mkdir()  # a text_encoder folder without tokenizer files -> shipped BPE
    assert load_tokenizer(tmp_path / "empty")(CHECK_PROMPT)["input_ids"] == CHECK_IDS


def test_padding_and_mask(tokenizer):
    enc = tokenizer(PROMPTS + ["word " * 100], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (4, 77)
    assert (ids[:, 0] == BOS).all()
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist()):
        first_eos = row_ids.index(EOS)
        assert row_mask == [1] * (first_eos + 1) + [0] * (76 - first_eos)
        assert all(t == EOS for t in row_ids[first_eos:])
    assert ids[1, :2].tolist() == [BOS, EOS] and mask[1].sum() == 2  # "" = BOS, EOS, pads
    assert ids[3, -1] == EOS and mask[3].all()  # truncated to 77 and still closed by EOS


# --- encoding --------------------------------------------------------------------------------

def test_encode_matches_clip_text_model(model, tokenizer):
    encoder = TextEncoder(model, tokenizer)
    out = encoder.encode(PROMPTS)
    assert out.shape == (3, 77, 128) and out.dtype == torch.float32
    assert encoder.hidden_size == 128 and encoder.device.type == "cpu" and encoder.dtype == torch.float32

    enc = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        unmasked = model(input_ids=enc["input_ids"]).last_hidden_state
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    # The mask only changes the padded positions (causal attention): proof that it was passed.
    pad = enc["attention_mask"] == 0
    assert not torch.allclose(out[pad], unmasked[pad], atol=1e-4)
    torch.testing.assert_close(out[~pad], unmasked[~pad], rtol=1e-5, atol=1e-5)

    # The unconditional embedding is the encoded empty string, batch-independent and not zeros.
    uncond = encoder.encode([""])
    torch.testing.assert_close(uncond[0], out[1], rtol=1e-5, atol=1e-5)
    assert uncond.abs().sum() > 0
    torch.testing.assert_close(encoder.encode(PROMPTS[0]), out[:1], rtol=1e-5, atol=1e-5)


# --- state-dict layouts ----------------------------------------------------------------------

def _to_openclip(sd, prefix):
    """Inverse of the OpenCLIP mapping (pack q/k/v), for round trips."""
    out = {}
    for key, value in sd.items():
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", key):
            n, kind = m[1], m[2]
            parts = [sd[f"encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        if re.search(r"self_attn\.[kv]_proj", key):
            continue
        for pattern, repl in [(r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
                              (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
                              (r"^final_layer_norm\.", "ln_final."),
                              (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
                              (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
                              (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
                              (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
                              (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj.")]:
            key = re.sub(pattern, repl, key)
        out[key] = value
    hidden = sd["embeddings.token_embedding.weight"].shape[1]
    out |= {"text_projection": torch.randn(hidden, 16), "logit_scale": torch.tensor(4.6)}
    return {prefix + k: v for k, v in out.items()}


def _layouts(sd):
    extras = {"text_projection.weight": torch.randn(16, 128), "logit_scale": torch.tensor(4.6)}
    hf = {"text_model." + k: v for k, v in sd.items()}
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older transformers saved it
    return {
        "transformers": hf | extras,
        "unprefixed": dict(sd),
        "text_encoder.": {"text_encoder." + k: v for k, v in (hf | extras).items()},
        "clip_g.transformer.": {"clip_g.transformer." + k: v for k, v in (hf | extras).items()}
                               | {"clip_l.logit_scale": torch.tensor(1.0)},
        "full CLIPModel": hf | extras | {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 2, 2),
                                         "visual_projection.weight": torch.zeros(16, 8)},
        "openclip": _to_openclip(sd, ""),
        "sdxl openclip": _to_openclip(sd, "conditioner.embedders.1.model."),
    }


def test_every_layout_loads_the_same_weights_and_outputs(model, tokenizer):
    sd = model.state_dict()
    reference = TextEncoder(model, tokenizer).encode(PROMPTS)
    for name, layout_sd in _layouts(sd).items():
        normalized = normalize_text_state_dict(layout_sd)
        assert normalized.keys() == sd.keys(), name
        encoder = build_text_encoder(layout_sd, expected="H", source_name=name)
        built = encoder.model.state_dict()
        assert all(torch.equal(built[k], sd[k]) for k in sd), name
        assert not encoder.model.training
        assert encoder.model.embeddings.position_ids.tolist() == [list(range(77))]
        torch.testing.assert_close(encoder.encode(PROMPTS), reference, rtol=0, atol=0, msg=name)


class _OpenClipTextReference(nn.Module):
    """OpenCLIP's text transformer written from torch primitives (packed MultiheadAttention, causal
    mask, no padding mask), to check the q/k/v split against an independent forward."""

    def __init__(self, width=128, layers=2, heads=2, mlp=37, vocab=49408, ctx=77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.02)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.ln_1, block.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            block.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            block.mlp = nn.Sequential()
            block.mlp.add_module("c_fc", nn.Linear(width, mlp))
            block.mlp.add_module("gelu", nn.GELU())
            block.mlp.add_module("c_proj", nn.Linear(mlp, width))
            self.transformer.resblocks.append(block)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, 16))
        for p in self.parameters():  # non-trivial norms and biases
            p.data.add_(torch.randn_like(p) * 0.05)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
        for b in self.transformer.resblocks:
            h = b.ln_1(x)
            x = x + b.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
            x = x + b.mlp(b.ln_2(x))
        return self.ln_final(x)


def test_openclip_layout_matches_an_independent_forward(tokenizer):
    torch.manual_seed(1)
    reference = _OpenClipTextReference().eval()
    sd = {"cond_stage_model.model." + k: v for k, v in reference.state_dict().items()}
    encoder = build_text_encoder(sd, expected="bigG")
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(ids)
        got = encoder.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_dtype_option(model, tokenizer):
    encoder = build_text_encoder(model.state_dict(), dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    assert encoder.model.embeddings.position_ids.dtype == torch.int64
    out = encoder.encode(PROMPTS)
    assert out.dtype == torch.bfloat16
    reference = TextEncoder(model, tokenizer).encode(PROMPTS)
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


# --- config ----------------------------------------------------------------------------------

def test_config_inferred_and_from_config_json(model):
    sd = model.state_dict()
    config = text_config_from_state_dict(sd)
    want = tiny_clip_text_config()
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps"):
        assert getattr(config, name) == getattr(want, name), name

    from_json = text_config_from_state_dict(sd, tiny_clip_text_config(hidden_act="quick_gelu").to_dict())
    assert from_json.hidden_act == "quick_gelu"
    clip_model_json = {"model_type": "clip", "text_config": want.to_dict()}
    assert text_config_from_state_dict(sd, clip_model_json).num_hidden_layers == 2

    with pytest.raises(CheckpointError, match=r"tiny\.json: its config\.json says num_hidden_layers=3 but its "
                                              r"weights have num_hidden_layers=2"):
        text_config_from_state_dict(sd, tiny_clip_text_config(num_hidden_layers=3).to_dict(), "tiny.json")


def _meta_tower(hidden, layers, prefix="text_model."):
    config = transformers.CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    with torch.device("meta"):
        return {prefix + k: v for k, v in transformers.CLIPTextModel(config).state_dict().items()}


def test_public_tower_sizes_are_inferred():
    bigg = text_config_from_state_dict(normalize_text_state_dict(_meta_tower(1280, 32)))
    assert (bigg.hidden_size, bigg.num_hidden_layers, bigg.num_attention_heads, bigg.intermediate_size,
            bigg.hidden_act) == (1280, 32, 20, 5120, "gelu")
    h = text_config_from_state_dict(normalize_text_state_dict(_meta_tower(1024, 24)))
    assert (h.num_attention_heads, h.hidden_act) == (16, "gelu")
    assert text_config_from_state_dict(normalize_text_state_dict(_meta_tower(768, 12))).hidden_act == "quick_gelu"

    # warp-ai/wuerstchen-prior text_encoder/config.json, legacy token ids included.
    prior_json = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                  "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
                  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 20,
                  "num_hidden_layers": 32, "projection_dim": 512, "torch_dtype": "float32",
                  "transformers_version": "4.33.0.dev0", "vocab_size": 49408}
    config = text_config_from_state_dict(normalize_text_state_dict(_meta_tower(1280, 32)), prior_json)
    assert (config.num_attention_heads, config.hidden_act, config.eos_token_id) == (20, "gelu", 2)
    check_tower(config, "bigG", "prior text_encoder")


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden, layers, expected, fragments", [
    (1024, 23, "H", ["sd2.safetensors is the 23-layer CLIP ViT-H/14 text tower of Stable Diffusion 2",
                     "lacks the last layer that Würstchen uses", "Stage B", "24 layers"]),
    (1280, 32, "H", ["is the CLIP ViT-bigG/14 text tower", "needs the Stage B (decoder) text encoder, "
                     "CLIP ViT-H/14"]),
    (1024, 24, "bigG", ["is the CLIP ViT-H/14 text tower", "needs the Stage C (prior) text encoder, "
                        "CLIP ViT-bigG/14 (hidden 1280, 32 layers)"]),
    (768, 12, "bigG", ["is the CLIP ViT-L/14 text tower (hidden 768, 12 layers)", "Stage C"]),
    (768, 12, "H", ["CLIP ViT-L/14", "Stage B"]),
])
def test_wrong_tower_messages(hidden, layers, expected, fragments):
    with pytest.raises(WrongComponentError) as info:
        build_text_encoder(_meta_tower(hidden, layers), expected=expected, source_name="sd2.safetensors")
    message = str(info.value)
    assert message.startswith("sd2.safetensors ")
    for fragment in fragments:
        assert fragment in message


def test_right_public_towers_pass_the_check():
    for hidden, layers, slot in ((1280, 32, "bigG"), (1024, 24, "H")):
        check_tower(text_config_from_state_dict(normalize_text_state_dict(_meta_tower(hidden, layers))), slot, "x")
    with pytest.raises(ValueError, match="expected must be one of"):
        check_tower(tiny_clip_text_config(), "L", "x")


def test_bad_state_dicts(model):
    with pytest.raises(WrongComponentError, match=r"^prior\.safetensors does not hold a CLIP text encoder"):
        build_text_encoder({"down_blocks.0.weight": torch.zeros(2)}, source_name="prior.safetensors")

    both = _meta_tower(768, 12, "clip_l.transformer.text_model.") | _meta_tower(1280, 32, "clip_g.transformer.text_model.")
    with pytest.raises(CheckpointError, match=r"holds 2 CLIP text towers \(under 'clip_g\.transformer\.text_model\.', "
                                              r"'clip_l\.transformer\.text_model\.'\)"):
        normalize_text_state_dict(both, "sdxl_clip.safetensors")

    sd = dict(model.state_dict())
    del sd["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"^te\.safetensors does not match a CLIPTextModel: missing "
                                              r"\['encoder\.layers\.1\.mlp\.fc2\.bias'\]"):
        build_text_encoder(sd, source_name="te.safetensors")

    sd = dict(model.state_dict())
    sd["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(38, 128)
    with pytest.raises(CheckpointError, match=r"^te\.safetensors does not match its CLIP text config: .*fc1\.weight"):
        build_text_encoder(sd, source_name="te.safetensors")

    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.layers.0.mlp")}
    with pytest.raises(CheckpointError, match=r"incomplete CLIP text encoder: tensor 'encoder\.layers\.0\.mlp\.fc1"):
        build_text_encoder(sd, source_name="te.safetensors")


def test_tiny_towers_pass_any_slot():
    encoder = tiny_text_encoder(seed=3)
    for slot in ("bigG", "H"):
        assert build_text_encoder(encoder.model.state_dict(), expected=slot).hidden_size == 128
