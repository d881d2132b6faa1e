"""GPU memory of the whole pipeline at the public sizes, predicted on any machine (no GPU, no weights).

Each network is built on the meta device and every stage's forward is traced op by op
(`wuerstchen_core.memory.trace_stage`): the peak is the weights that must be on the device plus the
largest traced activations plus memory.WORKSPACE for kernel workspaces. A prediction, not a
measurement: bench/gpu_bench.py measures the same configurations on a GPU.

    python bench/memory_predict.py [--out FILE.json]

tests/test_memory_budget.py pins these predictions to the targets of issue 5.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wuerstchen_core import memory  # noqa: E402
from wuerstchen_core.models import (DecoderConfig, PaellaVQGAN, PriorConfig, VQGANConfig,  # noqa: E402
                                    WuerstchenDecoder, WuerstchenPrior)
from wuerstchen_core.performance import store_linear_weights_in_fp8  # noqa: E402
from wuerstchen_core.text import TextEncoder  # noqa: E402

GiB = 2**30
FP16 = torch.float16
# the public text towers: CLIP ViT-bigG/14 (Stage C) and ViT-H/14 (Stage B)
TOWERS = {"bigG": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120),
          "H": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}
STAGE_OF = {"bigG": "text", "prior": "prior", "H": "text", "decoder": "decoder", "vqgan": "vqgan"}  # run order


def public_networks(fp8: bool = False) -> dict[str, torch.nn.Module]:
    """The public-size networks on the meta device in fp16 (fp8: Stage B/C Linear weights in float8)."""
    import transformers
    with torch.device("meta"):
        nets = {"prior": WuerstchenPrior(PriorConfig()), "decoder": WuerstchenDecoder(DecoderConfig()),
                "vqgan": PaellaVQGAN(VQGANConfig())}
        for tower, cfg in TOWERS.items():
            nets[tower] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **cfg))
    nets = {k: v.to(FP16).eval() for k, v in nets.items()}
    nets["decoder"].fold_effnet()  # the sampling form, as loading.load_decoder gives it
    if fp8:
        for k in ("prior", "decoder"):
            store_linear_weights_in_fp8(nets[k])
    return nets


def stage_peaks(nets, side: int = 1024, batch: int = 1, tile: int | None = None, cfg: bool = True) -> dict[str, int]:
    """Traced activation peak of every stage for `batch` images of side² px (Stage C with guidance)."""
    return {name: memory.trace_stage(nets[name], stage, height=side, width=side, batch=batch,
                                     guided=cfg and name in ("bigG", "prior"), tile=tile if stage == "vqgan" else None)
            for name, stage in STAGE_OF.items()}


def low_vram_weight_bytes(name: str, net) -> int:
    """Weights on the device during a low-VRAM stage, as the CLI runs it: the parts it streams
    (performance.on_device's `stream`: a text encoder's layers, Stage B/C's text mappers) visit the
    device one at a time, the rest is there for the whole stage."""
    if name in TOWERS:
        streamed = TextEncoder(net, tokenizer=None).layers
    else:
        streamed = getattr(net, "conditioning_layers", [])
    parts = [memory.weight_bytes(part) for part in streamed]
    return memory.weight_bytes(net) - sum(parts) + max(parts, default=0)


def predict(nets, side: int = 1024, batch: int = 1, tile: int | None = None) -> dict:
    """Predicted peaks: every model resident; the CLI's default (each text encoder loaded, run and
    freed first, then Stage C, B and A resident); one model on the device at a time (low-VRAM)."""
    weights = {k: memory.weight_bytes(v) for k, v in nets.items()}
    peaks = stage_peaks(nets, side, batch, tile)
    per_stage = {k: low_vram_weight_bytes(k, nets[k]) + peaks[k] + memory.WORKSPACE for k in peaks}
    sampling = [k for k in nets if k not in TOWERS]
    cli_default = max(*(weights[k] + peaks[k] for k in TOWERS),
                      sum(weights[k] for k in sampling) + max(peaks[k] for k in sampling)) + memory.WORKSPACE
    return {"side": side, "batch": batch, "tile": tile, "weights_gib": sum(weights.values()) / GiB,
            "all_resident_gib": (sum(weights.values()) + max(peaks.values()) + memory.WORKSPACE) / GiB,
            "cli_default_gib": cli_default / GiB,
            "low_vram_gib": max(per_stage.values()) / GiB,
            "low_vram_by_stage_gib": {k: round(v / GiB, 3) for k, v in per_stage.items()},
            "activations_gib": {k: round(v / GiB, 3) for k, v in peaks.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    fp16, fp8 = public_networks(), public_networks(fp8=True)
    rows = {"fp16 1024²": predict(fp16), "fp16 1024² batch 4": predict(fp16, batch=4),
            "fp16 2048²": predict(fp16, 2048), "fp16 2048² tiled 128": predict(fp16, 2048, tile=128),
            "fp8 B/C 1024²": predict(fp8)}
    print(f"{'configuration':<22} {'weights':>8} {'all resident':>13} {'CLI default':>12} {'low-VRAM':>9}  "
          "(GiB; low-VRAM by stage)")
    for name, r in rows.items():
        print(f"{name:<22} {r['weights_gib']:8.2f} {r['all_resident_gib']:13.2f} {r['cli_default_gib']:12.2f} "
              f"{r['low_vram_gib']:9.2f}  {r['low_vram_by_stage_gib']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
