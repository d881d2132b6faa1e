"""The pack's nodes as plain specs (see spec.py). Importing this package never imports ComfyUI;
comfy_host.py turns ALL_NODES into V3 nodes, runner.py runs them without ComfyUI."""

from . import conditioning, image, latents, loaders, sampling

ALL_NODES = (*loaders.NODES, *conditioning.NODES, *latents.NODES, *sampling.NODES, *image.NODES)
