"""GPU benchmark: the pack against diffusers' Würstchen modules on the same card, in one short run.

Public-size networks with random weights (no checkpoint needed), 1024² defaults: Stage C 29-step
preset with CFG 4 (batch 2 per image), Stage B 12 steps without CFG, Stage A decode.

    python bench/gpu_bench.py --out DIR            # on a CUDA machine (< 8 min on an H100/H200)
    python bench/gpu_bench.py --tiny --out DIR     # the same code paths with tiny models (CPU ok)

Prints a table per section and writes DIR/gpu_bench.json. Sections that would overrun --budget-s
are skipped and say so; all of them took 5.5 minutes on an H200 (2026-11-26, run 6; four sections
added or grown since, ≈ 1.5 min), most of it the two compiles of fast mode (batch 1 and batch 8, 87 s each). The
last, fast-mode steps at batch 2/4 and 1536²/2048² (a compile per shape, 90–100 s each), does not fit
after them (`--skip fast_sweep`; `--only fast_sweep` runs it alone, stopping before a shape that would
overrun --budget-s). Seven sections run only when named in --only, in a second process after the main
run: `grn_layout` (the channel MLP at batch-8 shapes in two layouts of the same arithmetic),
`autotune_b8` and `whole_compile` (experiments, compiled with cold caches: batch-8 steps with
mode="max-autotune"; fast mode with each network compiled whole, as before the twelfth session), `warm_compile` (fast mode's
first run with the compile caches the main run left on disk: what a later launch pays), and
`block_variants` / `step_variants_b8` (bench/block_variants.py: a batch-8 step's repeated units compiled
in other forms, then whole batch-8 steps in the forms that won; --forms-from reads an earlier
block_variants run, so the two fit in two device calls; `--chosen-forms` runs `fast_mode_b8` in the forms
that won), `fast_mode_b8_fp8` (batch 8 with the Stage B/C Linears multiplied in fp8: the features'
distance from fp16, eager and fast-mode s/image) and `fast_mode_b8_fused` (batch 8 in fast mode with GELU + GRN
as the pack's Triton kernels, performance.fuse_gelu_grn). `--only fast_mode_b8` skips batch 1's fast-mode compile.
Both batch-8 fast-mode rows also record per stage where the device idles (`idle`, bench/timeline.py)
and Stage A alone at batch 8, eager and as fast mode compiles it (`stage_a_s`). Fast mode compiles
Stage A's blocks too (performance.CompiledVQGAN); should that fail, a fast-mode row is measured again
with Stage A eager and records the failure (`stage_a_compiled`).
diffusers is needed only for the "diffusers" rows (test-only reference).
"""

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import block_variants as variants  # noqa: E402  (bench/, beside this file)
import timeline  # noqa: E402
from wuerstchen_core import memory  # noqa: E402
from wuerstchen_core import pipeline as wp  # noqa: E402
from wuerstchen_core.models import (  # noqa: E402
    DecoderConfig, PaellaVQGAN, PriorConfig, VQGANConfig, WuerstchenDecoder, WuerstchenPrior)
from wuerstchen_core.models.vqgan import MixingResidualBlock, ReplicationPad  # noqa: E402
from wuerstchen_core.performance import (  # noqa: E402
    GraphedNetwork, capture_cuda_graph, compile_errors, compile_model, fuse_gelu_grn, on_device,
    store_linear_weights_in_fp8)
from wuerstchen_core.schedule import stage_c_preset  # noqa: E402
from wuerstchen_core.text import TextEncoder, load_tokenizer  # noqa: E402

GiB = 2**30
# experiments: run only when named in --only
OPT_IN = ("grn_layout", "autotune_b8", "warm_compile", "whole_compile", "block_variants", "step_variants_b8",
          "fast_mode_b8_fp8", "fast_mode_b8_fused")
PROMPT = "an astronaut riding a horse on the moon, detailed, 8k"


# ------------------------------------------------------------------------------------------------
# models with random weights, built straight on the device (no throw-away init on the CPU)

def configs(tiny: bool):
    if tiny:
        return (PriorConfig(c_in=16, c=128, c_cond=64, c_r=64, depth=2, nhead=2),
                DecoderConfig(c_cond=64, c_hidden=(32, 64, 128, 128), nhead=(-1, 1, 2, 2), blocks=(1, 1, 2, 1),
                              clip_embd=64),
                VQGANConfig(bottleneck_blocks=2, embed_dim=32),
                dict(bigG=(64, 2), H=(64, 2)))
    return PriorConfig(), DecoderConfig(), VQGANConfig(), dict(bigG=(1280, 32), H=(1024, 24))


@torch.no_grad()
def random_init_(module, seed):
    p0 = next(module.parameters())
    g = torch.Generator(device=p0.device).manual_seed(seed)
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            t.zero_()
        elif name.endswith("running_var"):
            t.fill_(1.0)
        elif name in ("out.1.weight", "clf.1.weight"):
            t.zero_()  # output heads: eps ≈ x keeps random-weight sampling finite in fp16
        elif t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=g, device=t.device) * (0.5 / t[0].numel() ** 0.5))
        else:
            t.copy_(torch.randn(t.shape, generator=g, device=t.device) * 0.02)
    return module


def build(cls, cfg, device, dtype, seed):
    with torch.device("meta"):
        m = cls(cfg)
    m = m.to_empty(device=device).to(dtype)
    return random_init_(m, seed).eval().requires_grad_(False)


def text_encoder(hidden, layers, device, dtype, seed):
    import transformers
    cfg = transformers.CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      intermediate_size=hidden * 4, vocab_size=49408, max_position_embeddings=77,
                                      hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2)
    with torch.device(device):
        model = transformers.CLIPTextModel(cfg).to(dtype).eval().requires_grad_(False)
    return TextEncoder(model, load_tokenizer())


# ------------------------------------------------------------------------------------------------
# timing helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps=3, warmup=1):
    """Median wall time of fn() in seconds, device-synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device, box):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        sync(device)
        box["peak_gib"] = torch.cuda.max_memory_allocated() / GiB


def flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def resident_gib(device):
    return torch.cuda.memory_allocated() / GiB if device.type == "cuda" else 0.0


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# one image through our stages / through diffusers' pipelines

def ours_generate(m, size, batch, seed=0, prior_steps=None, decoder_steps=12, tile=None):
    return wp.generate(m["prior"], m["decoder"], m["vqgan"], m["text_c"], m["text_b"], PROMPT, "", width=size,
                       height=size, batch=batch, seed=seed, prior_steps=prior_steps, decoder_steps=decoder_steps,
                       tile=tile)


def fast_mode_models(m, device):
    """`m` with its networks as fast mode runs them: Stage B/C compiled (CUDA graphs on a GPU), Stage A's
    blocks compiled (performance.CompiledVQGAN)."""
    return dict(m, **{k: compile_model(m[k], device.type == "cuda") for k in ("prior", "decoder", "vqgan")})


def diffusers_pipelines(m, cfgs, device, dtype):
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import (
        PaellaVQModel, WuerstchenDecoderPipeline, WuerstchenDiffNeXt, WuerstchenPrior as RefPrior,
        WuerstchenPriorPipeline)
    pc, dc, vc, _ = cfgs
    fields = lambda cfg: dataclasses.asdict(cfg)  # noqa: E731
    with torch.device("meta"):
        prior = RefPrior(**fields(pc))
        dd = fields(dc)
        decoder = WuerstchenDiffNeXt(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in dd.items()})
        vq = PaellaVQModel(in_channels=vc.in_channels, out_channels=vc.out_channels, levels=vc.levels,
                           bottleneck_blocks=vc.bottleneck_blocks, embed_dim=vc.embed_dim,
                           latent_channels=vc.latent_channels, num_vq_embeddings=vc.num_vq_embeddings,
                           scale_factor=vc.scale_factor)
    for ref, ours in ((prior, m["prior"]), (decoder, m["decoder"]), (vq, m["vqgan"])):
        ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
        ref.eval().requires_grad_(False)
    pp = WuerstchenPriorPipeline(prior=prior, text_encoder=m["text_c"].model, tokenizer=m["text_c"].tokenizer,
                                 scheduler=DDPMWuerstchenScheduler())
    dp = WuerstchenDecoderPipeline(decoder=decoder, text_encoder=m["text_b"].model, tokenizer=m["text_b"].tokenizer,
                                   vqgan=vq, scheduler=DDPMWuerstchenScheduler(), latent_dim_scale=10.67)
    pp.set_progress_bar_config(disable=True)
    dp.set_progress_bar_config(disable=True)

    def run(size, seed=0):
        g = torch.Generator().manual_seed(seed)
        emb = pp(PROMPT, height=size, width=size, timesteps=stage_c_preset().tolist(), guidance_scale=4.0,
                 generator=g, output_type="pt").image_embeddings
        return dp(emb, PROMPT, num_inference_steps=12, guidance_scale=0.0, generator=torch.Generator().manual_seed(seed),
                  output_type="pt").images

    return run, prior, decoder


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU dry run of every code path)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip sections that would end after this")
    ap.add_argument("--skip", default="", help="comma-separated section names to skip")
    ap.add_argument("--only", default="", help="comma-separated section names to run (all others skipped)")
    ap.add_argument("--forms-from", default="", help="step_variants_b8 / --chosen-forms: the gpu_bench.json "
                    "of an earlier block_variants run on this machine (default: this run's)")
    ap.add_argument("--forms", default=",".join(variants.FORMS), help="block_variants: the forms to time, in "
                    "this order (the first must be 'compiled')")
    ap.add_argument("--chosen-forms", action="store_true", help="fast_mode_b8: the ResBlocks in the forms "
                    "block_variants chose per stage (this run's or --forms-from)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tiny = args.tiny
    sizes = [256, 384, 512] if tiny else [1024, 1536, 2048]
    base = sizes[0]
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "dtype": str(dtype), "tiny": tiny, "sections": {}}

    def log(*a):
        print(f"[{time.perf_counter() - t_start:6.1f}s]", *a, flush=True)

    def save():
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    def record(name, measure):
        """A section measured by one function: its result, or its failure (a finding, not the end of the
        run); then the device memory is freed and the results saved."""
        try:
            results["sections"][name] = measure()
        except Exception as e:
            results["sections"][name] = failed(e)
            log(results["sections"][name])
        free(device)
        save()

    def section(name, est_s):  # est_s: the section's seconds on the H200 (bench/results_h200), rounded up
        if name in skip or (only and name not in only) or (name in OPT_IN and name not in only):
            log(f"SKIP {name} (--skip/--only{'; runs only when named in --only' if name in OPT_IN else ''})")
            return False
        if time.perf_counter() - t_start + est_s > args.budget_s:
            log(f"SKIP {name}: would overrun the budget")
            results["sections"][name] = "skipped: budget"
            return False
        log(f"== {name}")
        return True

    import warnings
    caught = warnings.catch_warnings(record=True)
    fallbacks = caught.__enter__()
    warnings.simplefilter("always", RuntimeWarning)
    results["dtype_fallbacks"] = fallbacks  # replaced by the messages at the end
    # fast mode's compile limits, as the nodes and the CLI run it (its unit graphs are one function's compiles)
    compile_limits = compile_errors("gpu_bench")
    compile_limits.__enter__()
    cfgs = configs(tiny)
    pc, dc, vc, towers = cfgs
    m = dict(prior=build(WuerstchenPrior, pc, device, dtype, 1), decoder=build(WuerstchenDecoder, dc, device, dtype, 2),
             vqgan=build(PaellaVQGAN, vc, device, dtype, 3),
             text_c=text_encoder(*towers["bigG"], device, dtype, 4), text_b=text_encoder(*towers["H"], device, dtype, 5))
    log("models built", {k: round(sum(p.numel() for p in v.parameters()) / 1e6, 1) if hasattr(v, "parameters")
                         else round(sum(p.numel() for p in v.model.parameters()) / 1e6, 1) for k, v in m.items()})

    # ---- per-step times of the two networks (ours vs diffusers), batch and size sweep
    ref_run = None
    try:
        ref_run, ref_prior, ref_decoder = diffusers_pipelines(m, cfgs, device, dtype)
    except ImportError as e:
        log("diffusers unavailable:", e)
    m["decoder"].fold_effnet()  # the sampling form loading.load_decoder gives; diffusers' copy keeps the full weights

    def step_fns(net_c, net_b, size, batch, prepared=True):
        """One Stage C and one Stage B step; prepared: as the pipeline calls ours, with the per-run
        conditioning computed once (diffusers' modules take the raw conditioning every step)."""
        hc = wp.stage_c_grid(size, size)
        hb = wp.stage_b_grid(*hc)
        xc = torch.randn(2 * batch, pc.c_in, *hc, device=device, dtype=dtype)
        rc = torch.full((2 * batch,), 0.7, device=device, dtype=dtype)
        cc = torch.randn(2 * batch, 77, pc.c_cond, device=device, dtype=dtype)
        xb = torch.randn(batch, dc.c_in, *hb, device=device, dtype=dtype)
        rb = torch.full((batch,), 0.7, device=device, dtype=dtype)
        eb = torch.randn(batch, dc.effnet_embd, *hc, device=device, dtype=dtype)
        cb = torch.randn(batch, 77, dc.clip_embd, device=device, dtype=dtype)
        if not prepared:
            return (lambda: net_c(xc, rc, cc)), (lambda: net_b(xb, rb, eb, cb))
        with torch.no_grad():
            cond_c, cond_b = net_c.condition(cc), net_b.condition(eb, cb, hb)
        return (lambda: net_c(xc, rc, cond=cond_c)), (lambda: net_b(xb, rb, cond=cond_b))

    def with_fp8_networks(matmul):
        """m with fresh Stage B/C copies of the same weights, Linear weights in fp8 (multiplied in fp8 with
        `matmul`); the text encoders and the VQGAN shared."""
        return dict(m, prior=store_linear_weights_in_fp8(build(WuerstchenPrior, pc, device, dtype, 1), matmul),
                    decoder=store_linear_weights_in_fp8(build(WuerstchenDecoder, dc, device, dtype, 2).fold_effnet(),
                                                        matmul))

    # ---- one image stage by stage: low-VRAM (each model on the device only for its stage) or resident
    @contextlib.contextmanager
    def stage(name, model, low_vram, stats, stream=()):
        """on_device for low-VRAM; with `stats`, record the stage's seconds, peak and resident memory
        (the device synchronised at both ends: idle_timeline reads the stage's kernels inside its range)."""
        if stats is not None:
            sync(device)
            resident = resident_gib(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
        with torch.profiler.record_function(name):
            with (on_device(model, device, stream) if low_vram else contextlib.nullcontext(model)) as placed:
                yield placed
            if stats is not None:
                sync(device)
        if stats is not None:
            stats[name] = dict(s=round(time.perf_counter() - t, 4), resident_before_gib=round(resident, 3),
                               peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 3) if device.type == "cuda"
                               else None)

    def idle_timeline(models, batch):
        """Per stage of one staged batch (resident, synchronised at each stage's ends), under the profiler:
        wall, device-busy and idle ms, the largest idle gaps and the top kernels (bench/timeline.py)."""
        stats = {}
        with torch.no_grad(), torch.profiler.profile(activities=profiler_activities(device)) as prof:
            staged_generate(models, base, low_vram=False, stats=stats, batch=batch)
        level = timeline.DeviceType.CUDA if device.type == "cuda" else timeline.DeviceType.CPU
        return timeline.stage_timeline(prof.events(), list(stats), level)

    def staged_generate(models, size, low_vram=True, stats=None, batch=1):
        text_c, text_b = models["text_c"], models["text_b"]
        seeds = list(range(batch))
        with stage("text bigG", text_c.model, low_vram, stats, text_c.layers):  # as the CLI does it
            cond_c, unc_c = wp.encode_prompt(text_c, PROMPT, "", True)
        prior, decoder = models["prior"], models["decoder"]  # their text mappers stream, as in the CLI
        with stage("Stage C", prior, low_vram, stats, prior.conditioning_layers) as prior:
            c = wp.sample_stage_c(prior, cond_c, unc_c, height=size, width=size, seeds=seeds, cfg=4.0, device=device)
        with stage("text H", text_b.model, low_vram, stats, text_b.layers):
            cond_b = text_b.encode([PROMPT])
        with stage("Stage B", decoder, low_vram, stats, decoder.conditioning_layers) as decoder:
            b = wp.sample_stage_b(decoder, c, cond_b, seeds=seeds, device=device)
        with stage("Stage A", models["vqgan"], low_vram, stats) as vq:
            return wp.decode_stage_a(vq, b)

    combos = [(base, b) for b in (1, 2, 4, 8)] + [(s, 1) for s in sizes[1:]]  # (size, batch) of the sweeps
    if section("step_sweep", 30 if not tiny else 5):
        rows = []
        with torch.no_grad():
            for size, batch in combos:
                fc, fb = step_fns(m["prior"], m["decoder"], size, batch)
                row = dict(size=size, batch=batch, c_ms=timed(fc, device, 5) * 1e3, b_ms=timed(fb, device, 5) * 1e3,
                           c_tflop=flops_of(fc) / 1e12, b_tflop=flops_of(fb) / 1e12)
                if ref_run is not None:
                    rc_, rb_ = step_fns(ref_prior, ref_decoder, size, batch, prepared=False)
                    row.update(ref_c_ms=timed(rc_, device, 5) * 1e3, ref_b_ms=timed(rb_, device, 5) * 1e3)
                    rc_ = rb_ = None  # they hold diffusers' modules, which share our weights' storage
                row["c_tflops"] = row["c_tflop"] / row["c_ms"] * 1e3
                row["b_tflops"] = row["b_tflop"] / row["b_ms"] * 1e3
                rows.append(row)
                log({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
                free(device)
        results["sections"]["step_sweep"] = rows
        save()

    # ---- end to end, eager, all resident: ours vs diffusers alternating
    if section("e2e_eager", 40 if not tiny else 10):
        rows = []
        for size in sizes[:2]:
            box, ref_box = {}, {}
            ours_t, ref_t = [], []
            ours_generate(m, size, 1)  # warm-up
            if ref_run is not None:
                ref_run(size)
            for _ in range(3):
                with peak_memory(device, box):
                    ours_t.append(timed(lambda: ours_generate(m, size, 1), device, 1, 0))
                if ref_run is not None:
                    with peak_memory(device, ref_box):
                        ref_t.append(timed(lambda: ref_run(size), device, 1, 0))
            stages = {}
            staged_generate(m, size, low_vram=False, stats=stages)  # where the time goes
            # the peaks here include diffusers' modules (the full Stage B weights ours no longer hold after the
            # fold); the clean all-resident peak is measured after they are dropped (section all_resident)
            row = dict(size=size, ours_s=statistics.median(ours_t), ours_peak_gib=box.get("peak_gib"), stages=stages,
                       resident_gib=resident_gib(device), fp16_fallbacks_so_far=len(fallbacks))
            if ref_t:
                row.update(diffusers_s=statistics.median(ref_t), diffusers_peak_gib=ref_box.get("peak_gib"),
                           speedup=statistics.median(ref_t) / statistics.median(ours_t))
            rows.append(row)
            log(row)
        results["sections"]["e2e_eager"] = rows
        save()
    # diffusers' modules share our weights' storage: dropped here, or moving our models off the device
    # (low-VRAM sections) would leave their copies resident and inflate every later peak
    ref_run = ref_prior = ref_decoder = None
    free(device)
    log(f"resident after the diffusers sections: {resident_gib(device):.2f} GiB")

    def stage_slopes(size):
        """Each sampling stage run for 2 and for 12 steps, as the pipeline runs it: the difference is the
        cost of a step inside the loop (to set against the bare forward's), the rest the per-run cost."""
        text_c, text_b = m["text_c"], m["text_b"]
        cond_c, unc_c = wp.encode_prompt(text_c, PROMPT, "", True)
        cond_b = text_b.encode([PROMPT])
        c = wp.sample_stage_c(m["prior"], cond_c, unc_c, height=size, width=size, steps=2, device=device)
        runs = {"c": lambda k: wp.sample_stage_c(m["prior"], cond_c, unc_c, height=size, width=size, steps=k,
                                                 device=device),
                "b": lambda k: wp.sample_stage_b(m["decoder"], c, cond_b, steps=k, device=device)}
        out = {}
        for name, run in runs.items():
            t2, t12 = (timed(lambda k=k: run(k), device, 3, 1) for k in (2, 12))
            out[f"{name}_step_ms"] = (t12 - t2) / 10 * 1e3
            out[f"{name}_per_run_ms"] = (t2 * 1e3 - 2 * out[f"{name}_step_ms"])
        return out

    if section("all_resident", 10):  # the clean peak: no reference module holds a second copy any more
        box, stages = {}, {}
        with peak_memory(device, box):
            staged_generate(m, base, low_vram=False, stats=stages)
        text_gib = sum(memory.weight_bytes(m[k].model) for k in ("text_c", "text_b"))
        # the CLI's default peak (text encoders freed before sampling) = a sampling stage's peak - text_weights_gib
        results["sections"]["all_resident"] = dict(size=base, peak_gib=box.get("peak_gib"),
                                                   resident_before_gib=resident_gib(device), stages=stages,
                                                   text_weights_gib=text_gib / GiB, in_pipeline=stage_slopes(base))
        log(results["sections"]["all_resident"])
        save()

    def modules(models):
        return [v if isinstance(v, torch.nn.Module) else v.model for v in models.values()]

    def to_host(models):
        for mod in modules(models):
            mod.to("cpu")  # on_device pins the host copies on first use
        free(device)

    def measure_low_vram(name, models):
        """Time one image with every model on the host and one stage on the device at a time; then put
        the shared models `m` back on the device for the next sections."""
        to_host(m)  # nothing else stays resident while measuring
        to_host(models)
        resident = resident_gib(device)
        box, stages = {}, {}
        try:
            staged_generate(models, base)
            with peak_memory(device, box):
                t = timed(lambda: staged_generate(models, base), device, 2, 0)
            staged_generate(models, base, stats=stages)
            results["sections"][name] = dict(size=base, s=t, peak_gib=box.get("peak_gib"),
                                             resident_before_gib=resident, stages=stages,
                                             fp16_fallbacks_so_far=len(fallbacks))
        except Exception as e:  # a failure here is a finding; the later sections still run
            results["sections"][name] = failed(e)
        log(results["sections"][name])
        for mod in modules(m):
            mod.to(device)
        free(device)
        save()

    if section("low_vram", 30 if not tiny else 10):
        measure_low_vram("low_vram", m)

    # ---- batch throughput, eager
    if section("e2e_batch", 45 if not tiny else 10):
        rows = []
        for batch in (2, 4, 8):
            box = {}
            ours_generate(m, base, batch)
            with peak_memory(device, box):
                t = timed(lambda: ours_generate(m, base, batch), device, 1, 0)
            rows.append(dict(batch=batch, s_per_image=t / batch, peak_gib=box.get("peak_gib")))
            log(rows[-1])
            free(device)
        results["sections"]["e2e_batch"] = rows
        save()

    # ---- 2048² with tiled Stage A
    if section("e2e_2048_tiled", 15 if not tiny else 10):
        box = {}
        big = sizes[-1]
        tile = 128 if not tiny else 32
        ours_generate(m, big, 1, prior_steps=2, decoder_steps=2, tile=tile)
        with peak_memory(device, box):
            t = timed(lambda: ours_generate(m, big, 1, tile=tile), device, 1, 0)
        results["sections"]["e2e_2048_tiled"] = dict(size=big, s=t, peak_gib=box.get("peak_gib"), tile=tile,
                                                     resident_before_gib=resident_gib(device))
        log(results["sections"]["e2e_2048_tiled"])
        save()

    # ---- bf16
    if section("e2e_bf16", 15 if not tiny else 5) and device.type == "cuda":
        mb = {k: (v.to(torch.bfloat16) if isinstance(v, torch.nn.Module) else v) for k, v in m.items()}
        for k in ("text_c", "text_b"):
            mb[k].model.to(torch.bfloat16)
        ours_generate(mb, base, 1)
        t = timed(lambda: ours_generate(mb, base, 1), device, 3, 0)
        results["sections"]["e2e_bf16"] = dict(size=base, s=t)
        log(results["sections"]["e2e_bf16"])
        for k, v in m.items():
            (v if isinstance(v, torch.nn.Module) else v.model).to(dtype)
        save()

    if section("low_vram_fp8", 25 if not tiny else 10):
        measure_low_vram("low_vram_fp8", with_fp8_networks(matmul=False))

    # ---- the repeated units of a batch-8 step alone, eager and compiled in several forms (bench/block_variants.py),
    # then whole batch-8 steps compiled as fast mode does and with the forms the units chose (opt-in)
    step_s = 110 if not tiny else 20  # a whole batch-8 network's compile and timing, on the H200 (fast_mode_b8)
    if section("block_variants", 150 if not tiny else 60):
        reserved = (4 * step_s if "step_variants_b8" in only else 0) + (160 if "fast_mode_b8" in only else 0)
        deadline = t_start + args.budget_s - reserved - 60
        record("block_variants", lambda: variants.block_variants(
            m, step_fns, base, device, log, deadline, timed, first_call_and_ms, args.forms.split(","), tiny))
    found = results["sections"].get("block_variants")
    if found is None and os.path.exists(args.forms_from):
        with open(args.forms_from) as f:
            found = json.load(f)["sections"].get("block_variants")
    if section("step_variants_b8", step_s):
        record("step_variants_b8", lambda: variants.step_variants(
            m, step_fns, base, device, log, t_start + args.budget_s - step_s, first_call_and_ms, found["estimated_ms"],
            tiny)
            if isinstance(found, dict) else "skipped: no block_variants results (this run's or --forms-from)")

    # ---- fast mode (compiled, CUDA graphs); batch 8 is its own section (`--only fast_mode_b8` skips batch 1's compile)
    def stage_a_fallback(row_of, models):
        """row_of(models); should fast mode's compiled Stage A fail (a finding), the row again with Stage A
        eager, the failure recorded, so that the Stage B/C figures still come out of the run."""
        try:
            return row_of(models)
        except Exception as e:
            log("fast mode with Stage A compiled failed; again with Stage A eager:", failed(e))
            return dict(row_of(dict(models, vqgan=m["vqgan"])), stage_a_compiled=failed(e))

    def batch1_fast(models):
        t0 = time.perf_counter()
        ours_generate(models, base, 1)
        compile_s = time.perf_counter() - t0
        t = timed(lambda: ours_generate(models, base, 1), device, 3, 1)
        fc, fb = step_fns(models["prior"], models["decoder"], base, 1)
        with torch.no_grad():
            row = dict(size=base, batch=1, s_per_image=t, first_run_compile_s=compile_s,
                       c_ms=timed(fc, device, 10, 2) * 1e3, b_ms=timed(fb, device, 10, 2) * 1e3, stages={})
        staged_generate(models, base, low_vram=False, stats=row["stages"])  # where the time goes
        return row

    fast = fast_mode_models(m, device)
    # estimates since the twelfth session: the units compile 3–4× faster than the whole networks (CPU), not yet timed here
    if section("fast_mode", 110 if not tiny else 60):
        row = stage_a_fallback(batch1_fast, fast)
        results["sections"]["fast_mode"] = [row]
        log(row)
        save()

    def head_features(models):
        """What the output heads of one batch-8 Stage C and Stage B step get (eager models): the heads
        themselves are zero here (random_init_), so their inputs are where two forms can be compared."""
        torch.manual_seed(0)  # the same step inputs every time
        fc, fb = step_fns(models["prior"], models["decoder"], base, 8)
        return [variants.recorded_inputs([head], step)[0][0].float()
                for head, step in ((models["prior"].out, fc), (models["decoder"].clf, fb))]

    def rel_diff(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    def batch8_fast(models, **about):
        """The batch-8 fast-mode row: first run (compile included), s/image, stages, kernels, idle."""
        t0 = time.perf_counter()
        ours_generate(models, base, 8)
        compile_s = time.perf_counter() - t0
        t = timed(lambda: ours_generate(models, base, 8), device, 2, 0)
        stages = {}
        staged_generate(models, base, low_vram=False, stats=stages, batch=8)
        row = dict(size=base, batch=8, s_per_image=t / 8, first_run_compile_s=compile_s, stages=stages, **about)
        latent_b = torch.randn(8, dc.c_in, *wp.stage_b_grid(*wp.stage_c_grid(base, base)), device=device, dtype=dtype)
        row["stage_a_s"] = {name: timed(lambda: wp.decode_stage_a(vqgan, latent_b), device, 3, 1)  # same run, A/B
                            for name, vqgan in (("eager", m["vqgan"]), ("fast", models["vqgan"]))}
        latent_b = None
        try:  # the kernels of the whole batch (compiled and graph-replayed: no operator launches them)
            row["kernels"] = op_breakdown(lambda: ours_generate(models, base, 8), device, top=30, reps=1, kernels=True)
        except Exception as e:
            row["kernels"] = failed(e)
        try:
            row["idle"] = idle_timeline(models, 8)
        except Exception as e:
            row["idle"] = failed(e)
        return row

    if section("fast_mode_b8", 120 if not tiny else 60):  # likewise
        chosen = None
        if args.chosen_forms:  # use it with --only (a batch-1 fast_mode before would have compiled the pack's form)
            estimates = found.get("estimated_ms", {}) if isinstance(found, dict) else {}
            chosen = {stage: variants.layout_flags(variants.chosen_forms(estimates, stage))
                      for stage in ("Stage C", "Stage B")}
            log("fast_mode_b8 with the ResBlock forms block_variants chose:", chosen)
        with variants.variant(*chosen.values()) if chosen else contextlib.nullcontext():
            row = stage_a_fallback(lambda models: batch8_fast(models, resblock_forms=chosen), fast)
        results["sections"].setdefault("fast_mode", []).append(row)
        log(row)
        save()
    fast = None

    # ---- batch 8 in fast mode with each channel MLP's GELU + GRN as the pack's Triton kernels
    # (performance.fuse_gelu_grn, off by default until this row beats fast_mode_b8's; opt-in)
    if section("fast_mode_b8_fused", 150 if not tiny else 10):  # likewise
        def fused_row():
            if device.type != "cuda":
                return "skipped: the Triton kernels need a GPU here (tests/test_kernels.py runs them interpreted)"
            torch._dynamo.reset()  # fresh compiles: the fusion changes every ResBlock's graph
            plain_c, plain_b = head_features(m)
            eager_plain = timed(lambda: ours_generate(m, base, 1), device, 3, 1)
            fuse_gelu_grn(True)
            try:  # the kernels as built for this GPU against the eager ops, in one eager batch-8 step
                fused_c, fused_b = head_features(m)
                about = dict(stage_c_features_rel_diff_vs_plain=rel_diff(fused_c, plain_c),
                             stage_b_features_rel_diff_vs_plain=rel_diff(fused_b, plain_b),
                             eager_b1_s_plain=eager_plain,  # eager mode is launch-bound: 3 kernels instead of 7
                             eager_b1_s_fused=timed(lambda: ours_generate(m, base, 1), device, 3, 1))
                plain_c = plain_b = fused_c = fused_b = None
                log(about)
                fused = fast_mode_models(m, device)
                row = stage_a_fallback(lambda models: batch8_fast(models, fused_gelu_grn=True, **about), fused)
                from wuerstchen_core import kernels  # needs triton: imported on the GPU only
                row["apply_tiles"] = kernels.apply_tiles()
                return row
            finally:
                fuse_gelu_grn(False)
        record("fast_mode_b8_fused", fused_row)
        log(results["sections"]["fast_mode_b8_fused"])

    # ---- batch 8 with the Stage B/C Linears multiplied in fp8 (fp8_e4m3fn_fast; lossy, opt-in): fresh fp8 copies
    # of the same weights, eager and in fast mode, and how far one batch-8 step's features are from the fp16 pack's
    if section("fast_mode_b8_fp8", 170 if not tiny else 60):
        fp8 = with_fp8_networks(matmul=True)
        (c16, b16), (c8, b8) = head_features(m), head_features(fp8)
        about = dict(eager_s_per_image=timed(lambda: ours_generate(fp8, base, 8), device, 1, 0) / 8,
                     stage_c_features_rel_diff_vs_fp16=rel_diff(c8, c16), stage_b_features_rel_diff_vs_fp16=rel_diff(b8, b16))
        c16 = c8 = b16 = b8 = None
        fast = fast_mode_models(fp8, device)
        try:
            row = stage_a_fallback(lambda models: batch8_fast(models, **about), fast)
        except Exception as e:  # an fp8 matmul the compiler or the GPU refuses is a finding
            row = dict(size=base, batch=8, fast_mode=failed(e), **about)
        results["sections"]["fast_mode_b8_fp8"] = row
        log(row)
        fast = fp8 = None
        free(device)
        save()

    # ---- where a batch-8 step's device time goes, by operator (the batch-8 fast target is compute- and
    # memory-bound, so the question is which kernels, not how many)
    if section("profile", 30 if not tiny else 10):
        # Stage A too: at batch 8 it is 0.018 s of the 0.277 s per image, at about 120 TFLOP/s
        latent_b = torch.randn(8, dc.c_in, *wp.stage_b_grid(*wp.stage_c_grid(base, base)), device=device, dtype=dtype)
        steps = dict(zip(("Stage C", "Stage B"), step_fns(m["prior"], m["decoder"], base, 8)),
                     **{"Stage A": lambda: wp.decode_stage_a(m["vqgan"], latent_b)})
        try:
            results["sections"]["profile"] = {name: op_breakdown(fn, device) for name, fn in steps.items()}
            for name, rows in results["sections"]["profile"].items():
                log(name, "batch 8, top operators by self device time:", rows[:8])
            with torch.no_grad():  # what decode_stage_a's deterministic cuDNN flag costs (ConvTranspose2d)
                bare = timed(lambda: m["vqgan"].decode(latent_b), device, 3, 1)
                with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False):
                    tuned = timed(lambda: m["vqgan"].decode(latent_b), device, 3, 2)  # the first call autotunes
                pads = [blk.depthwise for blk in m["vqgan"].modules() if isinstance(blk, MixingResidualBlock)]
                for seq in pads:  # torch's own replication pad, as the reference runs it
                    seq[0] = torch.nn.ReplicationPad2d(1)
                torch_pad = timed(lambda: m["vqgan"].decode(latent_b), device, 3, 1)
                for seq in pads:
                    seq[0] = ReplicationPad(1)
            results["sections"]["profile"]["Stage A ms, batch 8"] = dict(
                decode_stage_a=timed(steps["Stage A"], device, 3, 1) * 1e3, bare_decode_default_cudnn=bare * 1e3,
                bare_decode_cudnn_benchmark=tuned * 1e3, bare_decode_torch_replication_pad=torch_pad * 1e3)
            log(results["sections"]["profile"]["Stage A ms, batch 8"])
        except Exception as e:  # a profiler failure must not cost the sections after it
            results["sections"]["profile"] = failed(e)
            log(results["sections"]["profile"])
        latent_b = steps = None
        save()

    # ---- the eager kernels replayed from a captured CUDA graph, no compile: how much of an eager step is
    # launch overhead, i.e. what a CUDA-graph mode without torch.compile's minute-long compile could give.
    # Last but the optional sweep: a failed capture can leave the CUDA context unusable for later sections.
    if section("graphed_eager", 25) and device.type == "cuda":
        rows = []
        for size, batch in combos:
            row = dict(size=size, batch=batch)
            for name, fn in zip("cb", step_fns(m["prior"], m["decoder"], size, batch)):
                replay = None
                try:
                    with torch.no_grad():
                        _, replay, _ = capture_cuda_graph(fn, device)
                    row[f"{name}_ms"] = timed(replay, device, 10, 2) * 1e3
                except Exception as e:  # a capture failure is a finding, not the end of the run
                    row[f"{name}_error"] = failed(e)
                replay = None
                free(device)
            rows.append(row)
            log(row)
        results["sections"]["graphed_eager"] = rows
        save()

    # ---- the CLI's --cuda-graphs: whole images with Stage B/C steps replayed from CUDA graphs
    if section("cuda_graphs", 20):  # on the CPU (--tiny) GraphedNetwork runs eager: a dry run of the code
        rows = []
        for batch in (1, 8):
            graphed = dict(m, prior=GraphedNetwork(m["prior"]), decoder=GraphedNetwork(m["decoder"]))
            try:
                t0 = time.perf_counter()
                ours_generate(graphed, base, batch)  # captures each network once
                sync(device)
                row = dict(size=base, batch=batch, first_run_s=time.perf_counter() - t0)
                box, row["stages"] = {}, {}
                with peak_memory(device, box):
                    row["s_per_image"] = timed(lambda: ours_generate(graphed, base, batch), device, 3, 0) / batch
                row["peak_gib"] = box.get("peak_gib")
                staged_generate(graphed, base, low_vram=False, stats=row["stages"], batch=batch)
            except Exception as e:
                row = dict(size=base, batch=batch, error=failed(e))
            graphed = None
            free(device)
            rows.append(row)
            log(row)
        results["sections"]["cuda_graphs"] = rows
        save()

    # ---- the steps with each fused attention kernel forced. Last of the default sections: a kernel that
    # faults on these shapes would leave the CUDA context unusable for what comes after it.
    if section("attention_backends", 20 if not tiny else 5):
        record("attention_backends", lambda: attention_backends(m["prior"], m["decoder"], step_fns, base, device, log))

    # ---- the channel MLP (Linear -> GELU -> GRN -> Linear) at batch-8 shapes, as the blocks compute it (the
    # GRN's spatial norm an outer reduction over NHWC tokens) and transposed (the first GEMM writes
    # [4c, B, HW], so the norm is an inner reduction): eager and compiled ms, and their difference (opt-in)
    if section("grn_layout", 60 if not tiny else 30):
        record("grn_layout", lambda: grn_layouts(device, dtype, tiny, log))

    # ---- batch-8 steps compiled with mode="max-autotune": Triton GEMM templates benchmarked against cuBLAS,
    # with the GELU/GRN/bias/residual passes fused into their prologues and epilogues where that wins.
    # Compile time and ms per step against fast_mode's steps in the loop (42.8 / 66.4 ms in run 6).
    if section("autotune_b8", 120 if not tiny else 60):  # and again before each network
        rows = []
        for name, key in (("Stage C", "prior"), ("Stage B", "decoder")):
            if time.perf_counter() - t_start + 120 > args.budget_s:
                log(f"autotune_b8: {name} would overrun the budget; stopped")
                break
            try:
                torch._dynamo.reset()  # no compiled code of an earlier section may be reused
                net = torch.compile(m[key], mode="max-autotune", fullgraph=True, dynamic=False)
                pair = step_fns(net, m["decoder"], base, 8) if key == "prior" else step_fns(m["prior"], net, base, 8)
                compile_s, ms = first_call_and_ms(pair[0 if key == "prior" else 1], device, cold=True)
                row = dict(stage=name, batch=8, compile_s=compile_s, ms=ms)
            except Exception as e:
                row = dict(stage=name, batch=8, error=failed(e))
            net = pair = None
            free(device)
            rows.append(row)
            log(row)
            results["sections"]["autotune_b8"] = rows
            save()

    # ---- fast mode's first run when an earlier process compiled the same shapes on this machine (torch's
    # on-disk compile caches): what a user pays at every launch after the first. Meaningful in a second
    # process after the main run (opt-in, like the experiments around it).
    if section("warm_compile", 60 if not tiny else 30):
        torch._dynamo.reset()  # this process's compiled code: forget it, keep the disk caches
        fast = fast_mode_models(m, device)
        t0 = time.perf_counter()
        ours_generate(fast, base, 1)
        sync(device)
        row = dict(size=base, batch=1, first_run_s=time.perf_counter() - t0)
        row["s_per_image"] = timed(lambda: ours_generate(fast, base, 1), device, 3, 1)
        results["sections"]["warm_compile"] = row
        log(results["sections"]["warm_compile"])
        fast = None
        free(device)
        save()

    # ---- fast mode as it was until the twelfth session, each network compiled whole (mode="reduce-overhead":
    # inductor's CUDA graphs), against fast_mode's compiled units (same Stage A): the first run (compile, with
    # cold caches) and s/image at batch 1 (opt-in; name it after fast_mode to compare in one process)
    if section("whole_compile", 200 if not tiny else 60):
        def whole_row():
            torch._dynamo.reset()  # Stage A compiles again too, as in fast_mode's first run
            whole = dict(m, vqgan=compile_model(m["vqgan"]), **{
                k: torch.compile(m[k], mode="reduce-overhead" if device.type == "cuda" else "default", fullgraph=True,
                                 dynamic=False) for k in ("prior", "decoder")})
            with cold_compile_caches():
                return batch1_fast(whole)
        record("whole_compile", whole_row)
        log(results["sections"]["whole_compile"])

    # ---- fast-mode steps at the other shapes of the eager sweep: one compile each (90–100 s on the H200),
    # so it does not fit the default budget after the rest; run it alone with --only fast_sweep
    per_shape_s = 110 if not tiny else 15  # a compile and the timings, on the H200 (run 7)
    if section("fast_sweep", per_shape_s):  # it stops before a shape that would overrun
        net_c, net_b = (compile_model(m[k], device.type == "cuda") for k in ("prior", "decoder"))
        rows = []
        for size, batch in [(base, 2), (base, 4), (sizes[1], 1), (sizes[2], 1)]:
            if time.perf_counter() - t_start + per_shape_s > args.budget_s:
                log(f"fast_sweep: {size}² batch {batch} would overrun the budget; stopped")
                break
            row = dict(size=size, batch=batch)
            for name, fn in zip("cb", step_fns(net_c, net_b, size, batch)):
                row[f"{name}_compile_s"], row[f"{name}_ms"] = first_call_and_ms(fn, device)
            with torch.no_grad():
                eager_c, eager_b = step_fns(m["prior"], m["decoder"], size, batch)
                row.update(c_tflops=flops_of(eager_c) / row["c_ms"] / 1e9, b_tflops=flops_of(eager_b) / row["b_ms"] / 1e9)
            rows.append(row)
            log(row)
            results["sections"]["fast_sweep"] = rows
            save()
    return finish(results, args, log)


def first_call_and_ms(fn, device, cold=False):
    """fn's first call in seconds (its compile; cold: without the on-disk compile caches), then its ms per
    call."""
    with torch.no_grad():
        t0 = time.perf_counter()
        with cold_compile_caches() if cold else contextlib.nullcontext():
            fn()
            sync(device)
        return time.perf_counter() - t0, timed(fn, device, 10, 2) * 1e3


def cold_compile_caches():
    """Compile as on a fresh machine: without the on-disk caches an earlier run (or section) filled."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(force_disable_caches=True)


def grn_layouts(device, dtype, tiny, log):
    """The channel MLP of a ResBlock, fc2(GRN(GELU(fc1(x)))), on batch-8 shapes (Stage C: 16 × 576 tokens of
    1536 channels, CFG included; Stage B's 128×128 level: 8 × 16384 tokens of 320), in two layouts of the
    same arithmetic: "tokens" as the blocks run it ([B, HW, 4c]: the GRN norm reduces over the strided token
    dimension) and "transposed" (fc1 writes [4c, B·HW], so the norm reduces over the contiguous dimension and
    fc2 reads the transposed map). Eager and torch.compile ms per call; largest difference of the outputs."""
    from torch.nn import functional as F

    def tokens(x, w1, b1, w2, b2, gamma, beta):  # x [B, N, c]
        h = F.gelu(F.linear(x, w1, b1))
        g = torch.linalg.vector_norm(h, dim=1, keepdim=True)  # [B, 1, 4c]
        d = g.mean(dim=-1, keepdim=True) + 1e-6
        return F.linear(torch.addcmul(beta, h, 1 + gamma * g / d), w2, b2)

    def transposed(x, w1, b1, w2, b2, gamma, beta):
        b, n, c = x.shape
        h = F.gelu(torch.addmm(b1[:, None], w1, x.reshape(b * n, c).t())).view(-1, b, n)  # [4c, B, N]
        g = torch.linalg.vector_norm(h, dim=-1, keepdim=True)  # [4c, B, 1]
        d = g.mean(dim=0, keepdim=True) + 1e-6
        z = torch.addcmul(beta[:, None, None], h, 1 + gamma[:, None, None] * g / d)
        return torch.addmm(b2, z.view(-1, b * n).t(), w2.t()).view(b, n, -1)

    shapes = [("Stage C", 16, 576, 1536), ("Stage B 128²", 8, 16384, 320)]
    if tiny:
        shapes = [(name, b, n // 16, c // 8) for name, b, n, c in shapes]
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, b, n, c in shapes:
        args = [torch.randn(*shape, device=device, generator=g).mul(scale).to(dtype) for shape, scale in
                (((b, n, c), 1.0), ((4 * c, c), c ** -0.5), ((4 * c,), 0.02), ((c, 4 * c), (4 * c) ** -0.5),
                 ((c,), 0.02), ((4 * c,), 0.1), ((4 * c,), 0.02))]
        row = dict(shape=name, batch=b, tokens=n, channels=c)
        with torch.no_grad():
            outs = {}
            for label, fn in (("tokens", tokens), ("transposed", transposed)):
                outs[label] = fn(*args).float()
                row[f"{label}_eager_ms"] = timed(lambda: fn(*args), device, 10, 2) * 1e3
                compiled = torch.compile(fn, fullgraph=True, dynamic=False)
                row[f"{label}_compile_s"], row[f"{label}_compiled_ms"] = first_call_and_ms(lambda: compiled(*args),
                                                                                          device, cold=True)
            row["max_abs_diff"] = (outs["tokens"] - outs["transposed"]).abs().max().item()
            row["max_abs"] = outs["tokens"].abs().max().item()
        rows.append(row)
        log(row)
    return rows


def attention_backends(prior, decoder, step_fns, size, device, log):
    """Stage B/C steps at batch 1 and 8 with each fused SDPA kernel forced (PyTorch picks flash first; cuDNN's
    is last in its default order): ms per step, and the largest difference of the last hidden map (the
    output head's input) from the default kernel's.
    A backend that cannot run a shape is recorded as an error, not a fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                    efficient=SDPBackend.EFFICIENT_ATTENTION)

    def last_hidden(fn):  # the output head's input: the bench's zeroed heads make the outputs ignore attention
        seen = {}
        hooks = [head.register_forward_pre_hook(lambda _, args: seen.update(h=args[0].float()))
                 for head in (prior.out, decoder.clf)]
        try:
            fn()
        finally:
            for hook in hooks:
                hook.remove()
        return seen["h"]

    rows = []
    for batch in (1, 8):
        for name, fn in zip(("Stage C", "Stage B"), step_fns(prior, decoder, size, batch)):
            with torch.no_grad():
                row, want = dict(stage=name, batch=batch, default_ms=timed(fn, device, 5, 1) * 1e3), last_hidden(fn)
                for label, backend in backends.items():
                    try:
                        with sdpa_kernel([backend]):
                            row[f"{label}_max_abs_diff"] = (last_hidden(fn) - want).abs().max().item()
                            row[f"{label}_ms"] = timed(fn, device, 5, 1) * 1e3
                    except Exception as e:  # this backend cannot run these shapes here: a finding
                        row[f"{label}_error"] = failed(e)
            rows.append(row)
            log(row)
    return rows


def failed(e: Exception) -> str:
    """A section's (or a row's) failure as recorded in the results: a finding, not the end of the run."""
    return f"failed: {type(e).__name__}: {e}"[:300]


def profiler_activities(device):
    """What torch.profiler records on `device`: the CPU operators, and on CUDA the kernels too."""
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def op_breakdown(fn, device, top=20, reps=3, kernels=False):
    """`fn`'s operators ranked by their own time on `device` over `reps` calls (torch.profiler; on
    CUDA the kernel time of each aten operator that launched them): name, ms per call, share of the
    total, calls per call of `fn`. kernels: rank the CUDA kernels themselves instead (a compiled,
    graph-replayed step has no aten operator per kernel); on the CPU the operators as before."""
    from torch.autograd import DeviceType

    cuda = device.type == "cuda"
    with torch.no_grad():
        fn()
        sync(device)
        with torch.profiler.profile(activities=profiler_activities(device)) as prof:
            for _ in range(reps):
                fn()
            sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # operators only (kernels are counted under the operator that launched them), or the kernels
    level = DeviceType.CUDA if cuda and kernels else DeviceType.CPU
    ops = [(e.key, getattr(e, attr), e.count) for e in prof.key_averages() if e.device_type == level]
    total = sum(t for _, t, _ in ops) or 1
    ops.sort(key=lambda o: -o[1])
    return [dict(op=k[:120], ms=t / reps / 1e3, share=t / total, calls=c // reps) for k, t, c in ops[:top] if t > 0]


def finish(results, args, log):
    results["dtype_fallbacks"] = [str(w.message) for w in results["dtype_fallbacks"] if "overflow" in str(w.message)]
    log("fp16 overflow fallbacks during the run:", len(results["dtype_fallbacks"]))
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    log("done; results in", os.path.join(args.out, "gpu_bench.json"))
    return results


if __name__ == "__main__":
    main()
