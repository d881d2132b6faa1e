"""Host time of the sampler's noise draws: inline on the caller's thread vs on the background workers.

A batch-8 Stage B run at 1024² draws its initial latent and one step noise per ddpm step, each
8×4×256×256 fp16 from 8 CPU generators (wuerstchen_core.sampling.NoiseSource). Prints one JSON line:
ms per draw inline, and with the workers (all 12 step draws reserved at once, as the sampler does,
then collected in order), plus the worker count; the draws are checked equal.

    python bench/noise_draw.py [--batch 8] [--steps 12]
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wuerstchen_core import sampling  # noqa: E402


def timed_draws(background: bool, batch: int, steps: int):
    source = sampling.NoiseSource(sampling.generators_for_seeds(list(range(batch))), "cpu", torch.float16,
                                  background=background)
    shape = (batch, 4, 256, 256)
    t = time.perf_counter()
    first = source(shape)
    source.reserve(steps, shape)
    draws = [first] + [source(shape) for _ in range(steps)]
    return (time.perf_counter() - t) / (steps + 1) * 1e3, draws


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    timed_draws(True, args.batch, 1)  # start the workers
    inline_ms, inline = timed_draws(False, args.batch, args.steps)
    background_ms, background = timed_draws(True, args.batch, args.steps)
    assert all(torch.equal(a, b) for a, b in zip(inline, background))
    print(json.dumps(dict(batch=args.batch, draws=args.steps + 1, inline_ms_per_draw=round(inline_ms, 2),
                          background_ms_per_draw=round(background_ms, 2), workers=len(sampling._noise_workers()),
                          cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())))


if __name__ == "__main__":
    main()
