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
