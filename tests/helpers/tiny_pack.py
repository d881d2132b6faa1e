"""A tiny ComfyUI-style models folder for the node/runner/workflow tests.

Widths chain like the real models (Stage C latent 16 channels, Stage B latent 4); the two text towers
have different widths (bigG stand-in 128, H stand-in 64) so that a mix-up cannot pass silently.
Files use the names `python -m wuerstchen_core convert` writes, so the example workflows find them.
"""

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from tests.helpers.tiny_effnet import TINY_EFFNET
from tests.helpers.tiny_models import randomize_, tiny_decoder, tiny_prior, tiny_vqgan
from tests.helpers.tiny_text import tiny_text_model
from wuerstchen_core.models.effnet import EfficientNetEncoder

BIGG_WIDTH, H_WIDTH = 128, 64
FILES = {"prior": "wuerstchen_v2_prior_fp16.safetensors", "decoder": "wuerstchen_v2_decoder_fp16.safetensors",
         "vqgan": "wuerstchen_v2_vqgan_fp16.safetensors", "effnet": "wuerstchen_v2_effnet_fp16.safetensors",
         "bigG": "wuerstchen_v2_text_bigG_fp16.safetensors", "H": "wuerstchen_v2_text_H_fp16.safetensors"}


def _save(module, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def write_tiny_models(models_dir: Path) -> Path:
    """models_dir/wuerstchen/* (all components), models_dir/text_encoders/clip_g.safetensors (a bigG stand-in)."""
    w = models_dir / "wuerstchen"
    _save(tiny_prior(c_in=16, c_cond=BIGG_WIDTH), w / FILES["prior"])
    _save(tiny_decoder(effnet_embd=16, clip_embd=H_WIDTH), w / FILES["decoder"])
    _save(tiny_vqgan(), w / FILES["vqgan"])
    _save(randomize_(EfficientNetEncoder(dataclasses.replace(TINY_EFFNET, c_latent=16)), 3).eval(), w / FILES["effnet"])
    _save(tiny_text_model(0, hidden_size=BIGG_WIDTH), w / FILES["bigG"])
    _save(tiny_text_model(1, hidden_size=H_WIDTH, num_attention_heads=1), w / FILES["H"])
    _save(tiny_text_model(2, hidden_size=BIGG_WIDTH), models_dir / "text_encoders" / "clip_g.safetensors")
    (w / "README.txt").write_text("not a model: must not be listed\n")
    return models_dir


def write_test_image(path: Path, size=256) -> Path:
    """An RGBA image whose alpha is 0 (→ LoadImage MASK 1 = inpaint) in the left half."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, : size // 2, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def text_to_image_workflow(width=256, prior_steps=2, decoder_steps=2, prior_sampler="ddpm", prefix="t"):
    """API-format text -> Stage C -> Stage B -> Stage A -> SaveImage graph over the FILES above (256 px high)."""
    return {
        "1": {"class_type": "WuerstchenLoadPrior", "inputs": {"model_name": FILES["prior"], "weight_dtype": "auto"}},
        "2": {"class_type": "WuerstchenLoadDecoder", "inputs": {"model_name": FILES["decoder"], "weight_dtype": "auto"}},
        "3": {"class_type": "WuerstchenLoadVQGAN", "inputs": {"model_name": FILES["vqgan"], "weight_dtype": "auto"}},
        "4": {"class_type": "WuerstchenLoadTextEncoder",
              "inputs": {"model_name": FILES["bigG"], "tower": "bigG (Stage C)", "weight_dtype": "auto"}},
        "5": {"class_type": "WuerstchenLoadTextEncoder",
              "inputs": {"model_name": FILES["H"], "tower": "H (Stage B)", "weight_dtype": "auto"}},
        "6": {"class_type": "WuerstchenTextEncode", "inputs": {"text_encoder": ["4", 0], "text": "a cat"}},
        "7": {"class_type": "WuerstchenTextEncode", "inputs": {"text_encoder": ["5", 0], "text": "a cat"}},
        "8": {"class_type": "WuerstchenEmptyLatent", "inputs": {"width": width, "height": 256, "batch_size": 1}},
        "9": {"class_type": "WuerstchenStageCSampler",
              "inputs": {"prior": ["1", 0], "positive": ["6", 0], "negative": ["6", 0], "latent": ["8", 0],
                         "seed": 3, "steps": prior_steps, "cfg": 4.0, "sampler": prior_sampler, "denoise": 1.0}},
        "10": {"class_type": "WuerstchenStageBSampler",
               "inputs": {"decoder": ["2", 0], "positive": ["7", 0], "negative": ["7", 0], "stage_c": ["9", 0],
                          "seed": 3, "steps": decoder_steps, "cfg": 0.0, "sampler": "ddpm", "denoise": 1.0}},
        "11": {"class_type": "WuerstchenStageADecode", "inputs": {"vqgan": ["3", 0], "samples": ["10", 0], "tile_size": 0}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": prefix}},
    }
