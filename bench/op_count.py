"""Operators per forward of Stage C and Stage B, counted on the CPU: what eager mode pays for on a GPU.

At batch 1 the eager GPU step is bound by launches, not FLOPs (bench/gpu_bench.py measured Stage B at
46 TFLOP/s on an H200), so every non-view operator of a forward costs host time. The networks keep the
public block structure (depth, blocks per level, attention placement) with narrow widths and a tiny
grid, so the count is that of the public networks and the run takes a second.

The sampling steps are also counted outside their repeated units (models.common.run_unit): what fast
mode, which compiles the units, still runs eager between them inside its captured step.

    python bench/op_count.py
"""

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wuerstchen_core.models import DecoderConfig, PriorConfig, WuerstchenDecoder, WuerstchenPrior  # noqa: E402
from wuerstchen_core.models.common import run_unit  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts dispatched operators; views (no kernel on any device) are counted apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.views, self.paused = collections.Counter(), 0, False

    def uncounted_unit(self, blocks, h, args):
        """run_unit with counting paused: a forward given this counts only what runs between its units."""
        self.paused = True
        try:
            return run_unit(blocks, h, args)
        finally:
            self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        if func.is_view or func._schema.name in ("aten::_unsafe_view", "aten::split", "aten::unbind", "aten::chunk"):
            self.views += 1
        else:
            self.ops[str(func.overloadpacket)] += 1
        return out


def main():
    dtype = torch.float16
    prior = WuerstchenPrior(PriorConfig(c=64, c_cond=32, nhead=1)).to(dtype).eval()
    decoder = WuerstchenDecoder(DecoderConfig(c_hidden=(16, 32, 64, 64), nhead=(-1, 1, 1, 1), c_cond=32,
                                              clip_embd=32)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    x_c, r_c, clip_c = (torch.randn(2, 16, 3, 3, generator=g).to(dtype), torch.rand(2).to(dtype),
                        torch.randn(2, 77, 32, generator=g).to(dtype))  # Stage C with CFG: batch 2
    x_b, r_b, effnet, clip_b = (torch.randn(1, 4, 32, 32, generator=g).to(dtype), torch.rand(1).to(dtype),
                                torch.randn(1, 16, 3, 3, generator=g), torch.randn(1, 77, 32, generator=g).to(dtype))
    with torch.inference_mode():
        cond_c, cond_b = prior.condition(clip_c), decoder.condition(effnet, clip_b, x_b.shape[-2:])
        calls = {  # a sampling step gets the conditioning prepared once per run; a plain forward makes it
            "Stage C (prior), sampling step": lambda _: prior(x_c, r_c, cond=cond_c),
            "Stage C (prior), sampling step outside its units":
                lambda count: prior(x_c, r_c, cond=cond_c, run_unit=count.uncounted_unit),
            "Stage C (prior), plain forward": lambda _: prior(x_c, r_c, clip_c),
            "Stage B (decoder), sampling step": lambda _: decoder(x_b, r_b, cond=cond_b),
            "Stage B (decoder), sampling step outside its units":
                lambda count: decoder(x_b, r_b, cond=cond_b, run_unit=count.uncounted_unit),
            "Stage B (decoder), plain forward": lambda _: decoder(x_b, r_b, effnet, clip_b),
        }
        for name, call in calls.items():
            with CountOps() as count:
                call(count)
            top = ", ".join(f"{op} {n}" for op, n in count.ops.most_common(6))
            print(f"{name}: {sum(count.ops.values())} operators (+ {count.views} views); {top}")

if __name__ == "__main__":
    main()
