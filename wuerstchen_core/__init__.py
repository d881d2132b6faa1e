"""Würstchen v2 in pure PyTorch: Stage C prior, Stage B decoder, Stage A VQGAN, text encoders,
samplers and checkpoint loading. Importable without ComfyUI."""

__version__ = "0.1.0"
