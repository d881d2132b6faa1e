"""Experiment (gpu_bench sections `block_variants` and `step_variants_b8`): where can a batch-8 fast-mode
step still shrink? The repeated units of a batch-8 step (Stage C's ResBlock+TimestepBlock+AttnBlock, Stage
B's level 0–2 units) are run alone with the inputs they get inside the network, eager
and compiled in several forms:

- compiled: as fast mode compiles them (compile_model);
- transposed: the channel MLP computed as [4c, B·HW] (the GRN's spatial norm an inner reduction, fc2
  reading the map transposed) — the same arithmetic;
- effnet_split: Stage B's effnet features through their own K=16 GEMM that an accumulating GEMM of the
  other inputs adds to (the blocks' form until the sixth session; compiled, the accumulation became a copy
  and a GEMM), where the blocks concatenate them to the first Linear's input (one GEMM);
- stencil_dw: the depthwise 3×3 conv written as nine shifted multiply-adds, which inductor can fuse with
  the bias and the LayerNorm after it into one kernel (cuDNN's conv writes its map, the LN reads it back);
- grn_triton: the GELU and GRN in the pack's Triton kernels, which read the map along its channels
  (wuerstchen_core/kernels.py; performance.fuse_gelu_grn puts them in the pack's own blocks);
- coordinate_descent: inductor's coordinate-descent tuning of its Triton kernels (block sizes, warps);
- max_autotune: mode="max-autotune" (Triton GEMM templates, fused prologues/epilogues where they win).

Each row: compile seconds, ms per call, largest difference from the eager output (relative to its
largest value), and the units' ms times their count per step: an estimate of each form's step. The
variant forwards live here, not in the pack: whatever wins is moved into the blocks afterwards.
"""

import contextlib
import sys
import time

import torch
import torch.nn.functional as F

from wuerstchen_core.models.common import LN_EPS, ResBlock, ResBlockStageB

GPU_ONLY = ("grn_triton", "coordinate_descent", "max_autotune")  # left out of the CPU dry run: Triton kernels
TUNINGS = {"compiled": {}, "coordinate_descent": {"coordinate_descent_tuning": True}, "max_autotune": {}}
# the forms that change the blocks' code: timed eager too
LAYOUTS = ("transposed", "effnet_split", "stencil_dw", "grn_triton")
CHANNEL_MLP_FORMS = ("grn_triton", "transposed")  # other code for the same part: at most one is chosen


def recorded_inputs(blocks, run):
    """The positional arguments each of `blocks` gets while run() runs the network once."""
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda _, args, i=i: seen.setdefault(i, args)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[i] for i in range(len(blocks))]


def chain(blocks, inputs):
    """The blocks run one after the other on the first one's recorded input, each with its own
    recorded extra arguments (modulation, text tokens, skip, effnet features)."""
    x = inputs[0][0]
    extras = [args[1:] for args in inputs]

    def run():
        h = x
        for block, extra in zip(blocks, extras):
            h = block(h, *extra)
        return h
    return run


def channel_mlp(channelwise, tokens, batch, weight, bias, extra, transposed, grn_triton=False):
    """fc2(GRN(GELU(tokens·weightᵀ + bias [+ extra]))) on [B·N, k] tokens -> [B·N, c]; extra: (e, w) whose
    e·wᵀ the first Linear accumulates. transposed: the hidden map is [4c, B·N]. grn_triton: GELU and GRN
    in wuerstchen_core/kernels.py's kernels."""
    _, gelu, grn, _, fc2 = channelwise
    if not transposed:
        u = F.linear(tokens, weight, bias)
        if extra is not None:
            u = u.addmm_(extra[0], extra[1].t())
        if grn_triton:
            from wuerstchen_core.kernels import gelu_grn  # needs triton: imported only by this form
            return fc2(gelu_grn(u.view(batch, -1, u.shape[-1]), grn.gamma, grn.beta)).flatten(0, 1)
        return fc2(grn(gelu(u.view(batch, -1, 1, u.shape[-1])))).flatten(0, 2)
    u = torch.mm(weight, tokens.t())  # [4c, B·N]; the bias joins the GELU's pass (a row bias has no GEMM epilogue)
    if extra is not None:
        u = u.addmm_(extra[1], extra[0].t())
    u = F.gelu(u + bias[:, None]).view(u.shape[0], batch, -1)  # [4c, B, N]
    g = torch.linalg.vector_norm(u, dim=-1, keepdim=True)  # [4c, B, 1]: a contiguous reduction
    d = g.mean(dim=0, keepdim=True) + 1e-6
    z = torch.addcmul(grn.beta.view(-1, 1, 1), u, torch.addcmul(d, grn.gamma.view(-1, 1, 1), g).div(d))
    return torch.addmm(fc2.bias, z.view(z.shape[0], -1).t(), fc2.weight.t())


def stencil_depthwise(conv, x):
    """conv(x) for a depthwise k×k Conv2d with zero padding k//2, as k² shifted multiply-adds."""
    k, (h, w) = conv.kernel_size[0], x.shape[-2:]
    padded = F.pad(x, (k // 2,) * 4)
    out = conv.bias.view(1, -1, 1, 1)
    for i in range(k):
        for j in range(k):
            out = out + padded[:, :, i:i + h, j:j + w] * conv.weight[:, 0, i, j].view(1, -1, 1, 1)
    return out


def block_forward(self, x, skip=None, effnet=None, *, transposed=False, effnet_split=False, stencil_dw=False,
                  grn_triton=False):
    """ResBlock / ResBlockStageB forward in a variant form (the pack's arithmetic, other kernels)."""
    b, c = x.shape[:2]
    mixed = stencil_depthwise(self.depthwise, x) if stencil_dw else self.depthwise(x)
    h = F.layer_norm(mixed.permute(0, 2, 3, 1), (c,), eps=LN_EPS)  # NHWC
    if skip is not None:
        h = torch.cat([h, skip.permute(0, 2, 3, 1)], dim=-1)
    fc1 = self.channelwise[0]
    weight, extra = fc1.weight, None
    if effnet is not None:
        if effnet_split:  # the effnet columns are the weight's last ones (ResBlockStageB.forward)
            k = h.shape[-1]
            weight, extra = weight[:, :k], (effnet.reshape(-1, effnet.shape[-1]), weight[:, k:])
        else:
            h = torch.cat([h, effnet], dim=-1)
    out = channel_mlp(self.channelwise, h.reshape(-1, h.shape[-1]), b, weight, fc1.bias, extra, transposed, grn_triton)
    return x + out.view(b, *x.shape[2:], c).permute(0, 3, 1, 2)


@contextlib.contextmanager
def variant(stage_c=None, stage_b=None):
    """The pack's ResBlocks (class-wide: Stage C's ResBlock, Stage B's ResBlockStageB) compute in the form
    their LAYOUTS flags that are true give (a dict per stage; None or all false: the pack's own form)."""
    forms = {ResBlock: stage_c or {}, ResBlockStageB: stage_b or {}}
    originals = {cls: cls.forward for cls in forms}
    if any(forms[ResBlock].values()):
        ResBlock.forward = lambda self, x: block_forward(self, x, **forms[ResBlock])
    if any(forms[ResBlockStageB].values()):
        ResBlockStageB.forward = lambda self, x, skip=None, effnet=None: block_forward(
            self, x, skip, effnet, **forms[ResBlockStageB])
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


def layout_flags(chosen):
    """The LAYOUTS part of a chosen_forms() dict (None: the pack's form)."""
    return {layout: bool(chosen and chosen[layout]) for layout in LAYOUTS}


def compiled(fn, tuning, cuda):
    """fn compiled as fast mode does (CUDA graphs on CUDA), or with max-autotune; `tuning`'s inductor
    options apply while the first call compiles (wrap it in tuned())."""
    if tuning == "max_autotune":
        mode = "max-autotune" if cuda else "max-autotune-no-cudagraphs"
    else:
        mode = "reduce-overhead" if cuda else "default"
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def tuned(tuning):
    import torch._inductor.config as inductor_config
    return inductor_config.patch(force_disable_caches=True, **TUNINGS[tuning])


def units(m, step_fns, base, batch):
    """(stage, unit, blocks, count per step, inputs) of the repeated units of a batch-`batch` step."""
    prior, decoder = m["prior"], m["decoder"]
    fc, fb = step_fns(prior, decoder, base, batch)
    dc = decoder.cfg
    out = [("Stage C", "res+film+attn", list(prior.blocks[:3]), prior.cfg.depth, fc)]
    for level in range(3):  # level 3 (16², 8 units) is left out: its units are the smallest
        blocks = list(decoder.down_blocks[level])[1 if level else 0:][:len(dc.level_config[level])]
        out.append(("Stage B", f"level {level} {dc.level_config[level]}", blocks, 2 * dc.blocks[level], fb))
    return [(stage, name, blocks, count, recorded_inputs(blocks, run)) for stage, name, blocks, count, run in out]


FORMS = ("compiled", "grn_triton", "transposed", "stencil_dw", "effnet_split", "coordinate_descent", "max_autotune")


def block_variants(m, step_fns, base, device, log, deadline, timed, first_call_and_ms, forms=FORMS, tiny=False):
    """The `block_variants` section: a row per unit (every form's compile s, ms and largest difference from
    eager) and the estimated step per form. Form by form in `forms`' order (the likeliest levers first),
    so a deadline cuts the rest. timed, first_call_and_ms: the bench's timing helpers. tiny: the CPU dry
    run, without the GPU_ONLY forms (Triton kernels, which a CPU does not run).
    Stage A is not among the units: compiled, its batch-8 decode took 154 ms against 114 eager on the
    H200 (run 10), after a 111 s compile; that compile traced the blocks' out= bands, which the compiler
    turns into a copy of the whole map per band. Fast mode now compiles the blocks in a cat form
    (performance.CompiledVQGAN); the fast-mode rows time it against eager (`stage_a_s`)."""
    cuda = device.type == "cuda"
    forms = [f for f in forms if not (tiny and f in GPU_ONLY)]
    assert forms[0] == "compiled", "the compiled form is every estimate's baseline"
    cases = []
    for stage, name, blocks, count, inputs in units(m, step_fns, base, 8):
        run = chain(blocks, inputs)
        effnet = any(isinstance(b, ResBlockStageB) and args[2] is not None for b, args in zip(blocks, inputs))
        with torch.no_grad():
            reference = run().float()
            row = dict(stage=stage, unit=name, per_step=count, eager_ms=timed(run, device, 10, 2) * 1e3)
        cases.append((row, run, reference, effnet))
    for form in forms:
        for row, run, reference, effnet in cases:
            if form == "effnet_split" and not effnet:
                row[form] = "n/a"
                continue
            if time.perf_counter() > deadline:
                row[form] = "skipped: budget"
                continue
            fn = out = None
            try:
                torch._dynamo.reset()
                tuning = form if form in TUNINGS else "compiled"
                flags = {layout: form == layout for layout in LAYOUTS}
                with variant(flags, flags):
                    if form in LAYOUTS:
                        with torch.no_grad():
                            row[f"{form}_eager_ms"] = timed(run, device, 10, 2) * 1e3
                    fn = compiled(run, tuning, cuda)
                    with tuned(tuning):
                        row[f"{form}_compile_s"], row[f"{form}_ms"] = first_call_and_ms(fn, device)
                    with torch.no_grad():
                        out = fn().float()
                row[f"{form}_rel_diff"] = ((out - reference).abs().max() / reference.abs().max()).item()
            except Exception as e:  # a form that does not compile is a finding
                row[form] = f"failed: {type(e).__name__}: {e}"[:300]
            fn = out = None
            log({k: v for k, v in row.items() if k.startswith(form) or k in ("stage", "unit")})
    rows = [case[0] for case in cases]
    found = dict(units=rows, estimated_ms=estimate(rows, forms))
    if "wuerstchen_core.kernels" in sys.modules:  # the apply tiles its autotuner picked per shape
        found["grn_triton_apply_tiles"] = sys.modules["wuerstchen_core.kernels"].apply_tiles()
    return found


def estimate(rows, forms):
    """Per stage and form: Σ unit ms × units per step (a form that does not apply to a unit costs its
    compiled, or for `<form>_eager` its eager, ms there); None where a form failed or was skipped in one
    of the stage's units."""
    est = {}
    for row in rows:
        stage = est.setdefault(row["stage"], {})
        for form in ["eager", *forms, *(f"{f}_eager" for f in LAYOUTS if f in forms)]:
            fallback = row.get("eager_ms" if form.endswith("_eager") else "compiled_ms")
            ms = row.get(f"{form}_ms", fallback if row.get(form.removesuffix("_eager")) == "n/a" else None)
            total = stage.get(form, 0.0)
            stage[form] = None if ms is None or total is None else total + ms * row["per_step"]
    return {stage: {form: None if ms is None else round(ms, 3) for form, ms in by_form.items()}
            for stage, by_form in est.items()}


def chosen_forms(estimated_ms, stage, threshold=0.01):
    """The forms that beat the compiled one in `stage`'s estimate by more than `threshold`: each of
    LAYOUTS (true or false) and the faster tuning, as step_variants takes them."""
    est = estimated_ms.get(stage, {})
    base = est.get("compiled")
    if base is None:
        return None
    wins = {form for form, ms in est.items() if ms is not None and ms < base * (1 - threshold)}
    rivals = sorted((est[form], form) for form in CHANNEL_MLP_FORMS if form in wins)
    wins -= {form for _, form in rivals[1:]}  # both replace the channel MLP: only the faster one applies
    tunings = sorted((est[t], t) for t in ("coordinate_descent", "max_autotune") if t in wins)
    return {**{layout: layout in wins for layout in LAYOUTS}, "tuning": tunings[0][1] if tunings else "compiled"}


def step_variants(m, step_fns, base, device, log, deadline, first_call_and_ms, estimated_ms, tiny=False):
    """The `step_variants_b8` section: whole batch-8 Stage C and B steps compiled as fast mode does and
    with the forms their units' estimate chose: compile s and ms per step, on the same machine.
    tiny: the CPU dry run, Stage C only (Stage B runs the same code with a longer CPU compile)."""
    cuda = device.type == "cuda"
    rows = []
    for index, (stage, key) in enumerate((("Stage C", "prior"), ("Stage B", "decoder"))[:1 if tiny else 2]):
        chosen = chosen_forms(estimated_ms, stage)
        if chosen is None:
            rows.append(dict(stage=stage, error="no compiled estimate from block_variants"))
            continue
        plain = {**{layout: False for layout in LAYOUTS}, "tuning": "compiled"}
        for label, forms in (("compiled", plain), ("chosen", chosen)):
            if label == "chosen" and forms == plain:
                break
            if time.perf_counter() > deadline:
                rows.append(dict(stage=stage, variant=label, error="skipped: budget"))
                break
            row = dict(stage=stage, variant=label, batch=8, **forms)
            net = step = None
            try:
                torch._dynamo.reset()
                flags = layout_flags(forms)
                with variant(flags, flags):  # one network compiles: only its own block class matters
                    net = compiled(m[key], forms["tuning"], cuda)
                    nets = (net, m["decoder"]) if index == 0 else (m["prior"], net)
                    step = step_fns(*nets, base, 8)[index]
                    with tuned(forms["tuning"]):
                        row["compile_s"], row["ms"] = first_call_and_ms(step, device)
            except Exception as e:
                row["error"] = f"failed: {type(e).__name__}: {e}"[:300]
            net = step = None
            rows.append(row)
            log(row)
    return rows
