"""Stage A on the CPU, eager vs fast mode (performance.CompiledVQGAN): seconds per decode and the peak
growth of the process's resident memory during one decode, next to memory.trace_stage's prediction.

The public-size VQGAN (random weights) decodes one image of --size px in fp32, eager and compiled in
alternating pairs after one compiling call. Resident memory is sampled every 0.5 ms on a thread; run it
with MALLOC_MMAP_THRESHOLD_=65536 so that every large allocation is mmapped and a free returns it
(otherwise the C allocator keeps freed memory and later peaks read low). Linux only (/proc). Prints
one JSON line.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/stage_a_cpu.py [--size 1024] [--pairs 2]
"""

import argparse
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wuerstchen_core import memory, performance, pipeline  # noqa: E402
from wuerstchen_core.models.vqgan import PaellaVQGAN, VQGANConfig  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn) -> tuple[float, float]:
    """(MiB the resident memory grew at most while fn() ran, seconds fn() took)."""
    base, peak, done = resident_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    return (max(peak[0], resident_bytes()) - base) / 2**20, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in px (a multiple of 4)")
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    vqgan = PaellaVQGAN(VQGANConfig()).eval()
    latent = torch.randn(1, 4, args.size // 4, args.size // 4)
    models = {"eager": vqgan, "fast": performance.compile_model(vqgan)}
    result = {"size": args.size, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    with torch.inference_mode():
        t = time.perf_counter()
        pipeline.decode_stage_a(models["fast"], latent)
        result["first_fast_s"] = round(time.perf_counter() - t, 1)
        pipeline.decode_stage_a(vqgan, latent)
        for name in [*models] * args.pairs:
            mib, seconds = peak_growth(lambda: pipeline.decode_stage_a(models[name], latent))
            result.setdefault(f"{name}_peak_mib", []).append(round(mib))
            result.setdefault(f"{name}_s", []).append(round(seconds, 2))
    meta = PaellaVQGAN(VQGANConfig()).to("meta")
    result["traced_eager_mib"] = round(memory.trace_stage(meta, "vqgan", height=args.size, width=args.size) / 2**20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
