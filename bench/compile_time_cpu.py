"""Fast mode's compile on the CPU: Stage B and C compiled whole (torch.compile of the network, fast mode
before the twelfth session) against in units (performance.compile_model: each kind of block compiled once
per shape). Public-size networks with random weights, fp32, no CUDA graphs.

Each (network, form) runs in a fresh process with an empty inductor cache, so its compile is cold: its
first compiled call (the compile and one step) in seconds, and the largest difference of that step from
the eager one, relative to its largest value; then once more in a second process with the caches the
first left on disk ("warm": what a later launch pays). The units' cold process also compiles the whole
network and times the steps of both forms and eager in alternating rounds (this machine's timings vary
by 10% and more between processes). Prints one JSON line per run and,
with --out, writes them all to a JSON file.

    python bench/compile_time_cpu.py [--out FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small grids: the compile does not depend on them, the eager and compiled calls stay short
GRIDS = {"prior": (2, 12, 12), "decoder": (1, 64, 64)}  # (batch, latent height, width)
ROUNDS = 3


def measure(network: str, form: str, launch: str) -> dict:
    import torch

    sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
    from gpu_bench import build  # public-size networks with random weights, built without a throw-away init

    from wuerstchen_core import performance
    from wuerstchen_core.models import DecoderConfig, PriorConfig, WuerstchenDecoder, WuerstchenPrior

    batch, h, w = GRIDS[network]
    g = torch.Generator().manual_seed(0)
    if network == "prior":
        model = build(WuerstchenPrior, PriorConfig(), torch.device("cpu"), torch.float32, 1)
        x = torch.randn(batch, model.cfg.c_in, h, w, generator=g)
        cond = model.condition(torch.randn(batch, 77, model.cfg.c_cond, generator=g))
    else:
        model = build(WuerstchenDecoder, DecoderConfig(), torch.device("cpu"), torch.float32, 2).fold_effnet()
        x = torch.randn(batch, model.cfg.c_in, h, w, generator=g)
        effnet = torch.randn(batch, model.cfg.effnet_embd, h * 3 // 16, w * 3 // 16, generator=g)
        cond = model.condition(effnet, torch.randn(batch, 77, model.cfg.clip_embd, generator=g), (h, w))
    head = model.out[1] if network == "prior" else model.clf[1]
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)  # build() zeroes it: the output would be x, whatever ran
    r = torch.full((batch,), 0.7)
    forms = {"whole": lambda: torch.compile(model, fullgraph=True, dynamic=False),
             "units": lambda: performance.compile_model(model, cuda_graphs=False)}
    with torch.no_grad(), performance.compile_errors("compile_time_cpu"):
        eager = model(x, r, cond=cond)
        compiled = {form: forms[form]()}
        t0 = time.perf_counter()
        out = compiled[form](x, r, cond=cond)
        row = dict(network=network, form=form, launch=launch, grid=GRIDS[network],
                   first_call_s=round(time.perf_counter() - t0, 1),
                   rel_diff=((out - eager).abs().max() / eager.abs().max()).item())
        if form == "units" and launch == "cold":  # the steps of both forms (and eager) in alternating rounds
            compiled = {"whole": forms["whole"](), "units": compiled["units"], "eager": model}
            compiled["whole"](x, r, cond=cond)
            for _ in range(ROUNDS):
                for name, fn in compiled.items():
                    t0 = time.perf_counter()
                    fn(x, r, cond=cond)
                    row.setdefault(f"{name}_step_s", []).append(round(time.perf_counter() - t0, 2))
    return dict(row, torch=torch.__version__, threads=torch.get_num_threads())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows to this JSON file")
    parser.add_argument("--one", nargs=3, metavar=("NETWORK", "FORM", "LAUNCH"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)), flush=True)
        return
    rows = []
    for network in GRIDS:
        for form in ("whole", "units"):
            with tempfile.TemporaryDirectory() as cache:  # a cold compile: nothing from an earlier run
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                for launch in ("cold", "warm"):  # warm: a later process, with the caches the first one left
                    done = subprocess.run([sys.executable, __file__, "--one", network, form, launch], env=env,
                                          check=True, capture_output=True, text=True)
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
