"""CPU benchmark: the pack's networks and sampling loop against diffusers' Würstchen v2, in one process.

Mid-size random-weight networks (same weights in both), fp32, a 512² image: Stage C 12×12 with CFG
(batch 2 per step), Stage B 128×128 without CFG (batch 1), Stage A decode to 512². Every timed item
runs ours and diffusers' back to back, alternating which goes first, over several rounds; the table
shows medians, minima (noise on a shared machine only adds time) and the median of the per-round
ours/diffusers ratios ("paired"). diffusers is the test-only reference: it is imported only here.

    python bench/cpu_vs_diffusers.py --out /tmp/cpu_bench.json          # ~2.5 min on 2 cores
    python bench/cpu_vs_diffusers.py --rounds 5 --loop-rounds 3 --threads 2 --out ...
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffusers import DDPMWuerstchenScheduler  # noqa: E402
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior as RefPrior  # noqa: E402
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel  # noqa: E402

from wuerstchen_core import pipeline as wp  # noqa: E402
from wuerstchen_core.models import (  # noqa: E402
    DecoderConfig, PaellaVQGAN, PriorConfig, VQGANConfig, WuerstchenDecoder, WuerstchenPrior)
from wuerstchen_core.schedule import linear_timesteps  # noqa: E402

PRIOR = PriorConfig(c_in=16, c=512, c_cond=1280, c_r=64, depth=8, nhead=8)
DECODER = DecoderConfig(c_hidden=(160, 320, 640, 640), nhead=(-1, 5, 10, 10), blocks=(2, 2, 6, 2), c_cond=1024,
                        clip_embd=1024)
VQGAN = VQGANConfig(embed_dim=192, bottleneck_blocks=4)
SIZE, TOKENS, CFG_C = 512, 77, 4.0


@torch.no_grad()
def randomize_(module, seed):
    """N(0, 1/fan_in) matrices, N(0, 0.2²) vectors, BatchNorm variance 1: O(1) activations at any depth."""
    g = torch.Generator().manual_seed(seed)
    for name, t in sorted(module.state_dict(keep_vars=True).items()):
        if not t.is_floating_point():
            t.zero_()
        elif name.endswith("running_var"):
            t.fill_(1.0)
        elif t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return module.eval().requires_grad_(False)


def pair(ours_cls, cfg, ref_cls, seed, **ref_kw):
    """(ours, diffusers') with the same random weights."""
    with torch.device("meta"):
        ref = ref_cls(**ref_kw)
        ours = ours_cls(cfg)
    ref = randomize_(ref.to_empty(device="cpu"), seed)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval().requires_grad_(False), ref


def as_lists(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_generate(prior, decoder, vqgan, text_c, neg_c, text_b, steps_c, steps_b, seed, times):
    """The reference pipelines' loops (WuerstchenPriorPipeline + WuerstchenDecoderPipeline), without text."""
    def ddpm_loop(eps_fn, shape, steps):
        sched = DDPMWuerstchenScheduler()
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        for t in sched.timesteps[:-1]:
            r = t.expand(x.shape[0])
            x = sched.step(eps_fn(x, r), r, x, generator=g).prev_sample
        return x

    def prior_eps(x, r):
        cond, uncond = prior(torch.cat([x, x]), torch.cat([r, r]), torch.cat([text_c, neg_c])).chunk(2)
        return torch.lerp(uncond, cond, CFG_C)

    t0 = time.perf_counter()
    c = ddpm_loop(prior_eps, (1, PRIOR.c_in, SIZE * 3 // 128, SIZE * 3 // 128), steps_c)
    effnet = c * 42.0 - 1.0
    t1 = time.perf_counter()
    hb = int(effnet.shape[-1] * 10.67)
    b = ddpm_loop(lambda x, r: decoder(x, r, effnet, text_b), (1, DECODER.c_in, hb, hb), steps_b)
    t2 = time.perf_counter()
    img = vqgan.decode(b * vqgan.config.scale_factor).sample.clamp(0, 1)
    t3 = time.perf_counter()
    times.update(stage_c=t1 - t0, stage_b=t2 - t1, stage_a=t3 - t2, total=t3 - t0)
    return img


def ours_generate(prior, decoder, vqgan, text_c, neg_c, text_b, steps_c, steps_b, seed, times):
    t0 = time.perf_counter()
    c = wp.sample_stage_c(prior, text_c, neg_c, height=SIZE, width=SIZE, seeds=seed,
                          timesteps=linear_timesteps(steps_c), cfg=CFG_C)
    t1 = time.perf_counter()
    b = wp.sample_stage_b(decoder, c, text_b, seeds=seed, steps=steps_b, cfg=0.0)
    t2 = time.perf_counter()
    img = wp.decode_stage_a(vqgan, b)
    t3 = time.perf_counter()
    times.update(stage_c=t1 - t0, stage_b=t2 - t1, stage_a=t3 - t2, total=t3 - t0)
    return img


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "?"
    return dict(cpu=model, nproc=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), git_commit=commit,
                load_avg=os.getloadavg())


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the per-step forwards")
    ap.add_argument("--loop-rounds", type=int, default=3, help="alternating rounds of the full sampling loop")
    ap.add_argument("--steps-c", type=int, default=4)
    ap.add_argument("--steps-b", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = dict(machine(), threads=torch.get_num_threads(), rounds=args.rounds, loop_rounds=args.loop_rounds,
                steps_c=args.steps_c, steps_b=args.steps_b, image=SIZE, cfg_c=CFG_C,
                prior=dataclasses.asdict(PRIOR), decoder=dataclasses.asdict(DECODER), vqgan=dataclasses.asdict(VQGAN))

    prior, ref_prior = pair(WuerstchenPrior, PRIOR, RefPrior, 1, **dataclasses.asdict(PRIOR))
    decoder, ref_decoder = pair(WuerstchenDecoder, DECODER, WuerstchenDiffNeXt, 2, **as_lists(DECODER))
    # keep the output gates |1-b| (prior) and sigmoid(b) (decoder) O(1): random weights put some near 0,
    # where the division amplifies float rounding and ours-vs-diffusers agreement says nothing
    for ref in (ref_prior, ref_decoder):  # ours share these tensors (loaded with assign=True)
        conv = ref.out[1] if ref is ref_prior else ref.clf[1]
        half = conv.bias.shape[0] // 2
        conv.bias[half:] += -4 if ref is ref_prior else 4
    decoder.fold_effnet()  # the sampling form load_decoder gives (after the bias shift above, which it keeps)
    vqgan, ref_vqgan = pair(PaellaVQGAN, VQGAN, PaellaVQModel, 3, **dataclasses.asdict(VQGAN))

    g = torch.Generator().manual_seed(0)
    hc, hb = SIZE * 3 // 128, int(SIZE * 3 // 128 * 10.67)
    text_c, neg_c = torch.randn(1, TOKENS, PRIOR.c_cond, generator=g), torch.randn(1, TOKENS, PRIOR.c_cond, generator=g)
    text_b = torch.randn(1, TOKENS, DECODER.clip_embd, generator=g)
    xc, rc = torch.randn(2, PRIOR.c_in, hc, hc, generator=g), torch.tensor([0.7, 0.7])
    clip_c = torch.cat([text_c, neg_c])
    xb, rb = torch.randn(1, DECODER.c_in, hb, hb, generator=g), torch.tensor([0.5])
    effnet = torch.randn(1, PRIOR.c_in, hc, hc, generator=g) * 3
    zb = torch.randn(1, VQGAN.latent_channels, hb, hb, generator=g)

    forwards = {  # name: (ours, diffusers')
        "Stage C forward (B=2, 12x12)": (lambda: prior(xc, rc, clip_c), lambda: ref_prior(xc, rc, clip_c)),
        "Stage B forward (B=1, 128x128)": (lambda: decoder(xb, rb, effnet, text_b),
                                           lambda: ref_decoder(xb, rb, effnet, text_b)),
        "Stage A decode (128x128 -> 512²)": (lambda: vqgan.decode(zb),
                                              lambda: ref_vqgan.decode(zb * VQGAN.scale_factor).sample),
    }
    agreement = {name: rel_err(o(), d()) for name, (o, d) in forwards.items()}  # also warms both up
    samples = {name: ([], []) for name in forwards}
    for rnd in range(args.rounds):
        for name, fns in forwards.items():
            for k in ((0, 1) if rnd % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                fns[k]()
                samples[name][k].append(time.perf_counter() - t)

    gen_args = (text_c, neg_c, text_b, args.steps_c, args.steps_b, 0)
    loops = {"ours": [], "diffusers": []}
    runs = {"ours": lambda tm: ours_generate(prior, decoder, vqgan, *gen_args, tm),
            "diffusers": lambda tm: diffusers_generate(ref_prior, ref_decoder, ref_vqgan, *gen_args, tm)}
    images = {}
    for rnd in range(args.loop_rounds):
        for who in (("ours", "diffusers") if rnd % 2 == 0 else ("diffusers", "ours")):
            tm = {}
            images[who] = runs[who](tm)
            loops[who].append(tm)
    agreement["full loop image"] = rel_err(images["ours"], images["diffusers"])

    rows = []
    for name, (o, d) in samples.items():
        rows.append(dict(item=name, ours_s=statistics.median(o), diffusers_s=statistics.median(d), ours_all=o,
                         diffusers_all=d))
    loop_label = f"loop: C {args.steps_c} steps CFG, B {args.steps_b} steps, A decode"
    for key in ("stage_c", "stage_b", "stage_a", "total"):
        o, d = [t[key] for t in loops["ours"]], [t[key] for t in loops["diffusers"]]
        rows.append(dict(item=f"{loop_label}: {key}", ours_s=statistics.median(o), diffusers_s=statistics.median(d),
                         ours_all=o, diffusers_all=d))
    for row in rows:  # on a shared machine noise only adds time: the minima and paired ratios say more
        o, d = row["ours_all"], row["diffusers_all"]
        row.update(ratio=row["ours_s"] / row["diffusers_s"], ours_min_s=min(o), diffusers_min_s=min(d),
                   ratio_min=min(o) / min(d), ratio_paired=statistics.median(a / b for a, b in zip(o, d)))
    fwd = [r for r in rows if "forward" in r["item"] or "decode (" in r["item"]]
    summary = dict(sum_of_forward_medians_ratio=sum(r["ours_s"] for r in fwd) / sum(r["diffusers_s"] for r in fwd),
                   sum_of_forward_minima_ratio=sum(r["ours_min_s"] for r in fwd) / sum(r["diffusers_min_s"] for r in fwd),
                   full_loop_ratio=rows[-1]["ratio"], full_loop_ratio_min=rows[-1]["ratio_min"],
                   full_loop_ratio_paired=rows[-1]["ratio_paired"])
    info["load_avg_end"] = os.getloadavg()

    print(f"{info['cpu']} | nproc {info['nproc']} | threads {info['threads']} | torch {info['torch']} | "
          f"{info['date']} | commit {info['git_commit']} | load {info['load_avg'][0]:.2f}->{info['load_avg_end'][0]:.2f}")
    w = max(len(r["item"]) for r in rows)
    print(f"{'item':<{w}}  {'ours med':>8}  {'diff med':>8}  {'ratio':>5}  {'ours min':>8}  {'diff min':>8}  "
          f"{'ratio':>5}  {'paired':>6}")
    for r in rows:
        print(f"{r['item']:<{w}}  {r['ours_s']:8.3f}  {r['diffusers_s']:8.3f}  {r['ratio']:5.3f}  {r['ours_min_s']:8.3f}  "
              f"{r['diffusers_min_s']:8.3f}  {r['ratio_min']:5.3f}  {r['ratio_paired']:6.3f}")
    print("ours/diffusers: sum of forward medians {sum_of_forward_medians_ratio:.3f}, minima "
          "{sum_of_forward_minima_ratio:.3f}; full loop medians {full_loop_ratio:.3f}, minima {full_loop_ratio_min:.3f}, "
          "paired {full_loop_ratio_paired:.3f}".format(**summary))
    print("max rel err ours vs diffusers: " + ", ".join(f"{k}: {v:.1e}" for k, v in agreement.items()))
    with open(args.out, "w") as f:
        json.dump(dict(info=info, rows=rows, summary=summary, max_rel_err=agreement), f, indent=1)


if __name__ == "__main__":
    main()
