"""The speed and memory options of wuerstchen_core.performance, and the sampler nodes' fast mode.

Timings are not tested here (bench/ measures them); these tests check that each option computes the
same thing and moves memory the way it says."""

import logging
import re
import types

import pytest
import torch

from nodes import conditioning, image, latents, loaders, sampling
from nodes.host import StandaloneHost
from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
from tests.helpers.tiny_pack import FILES, write_tiny_models
from wuerstchen_core import memory, performance, pipeline
from wuerstchen_core.errors import WuerstchenError
from wuerstchen_core.models.common import run_unit
from wuerstchen_core.performance import Fp8Linear, on_device, store_linear_weights_in_fp8


def prior_inputs(prior, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, prior.cfg.c_in, 6, 6, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 77, prior.cfg.c_cond, generator=g))


def decoder_inputs(decoder, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, decoder.cfg.c_in, 32, 32, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, decoder.cfg.effnet_embd, 6, 6, generator=g),
            torch.randn(batch, 77, decoder.cfg.clip_embd, generator=g))


# ---------------------------------------------------------------------------------------------
# low-VRAM: on_device


def test_on_device_uploads_inside_the_block_and_never_copies_back():
    """The meta device stands in for a GPU: inside the block every weight is there, after it each
    parameter holds its original host tensor again (the same storage: no device-to-host copy)."""
    prior = tiny_prior()
    host = {name: t.data for name, t in [*prior.named_parameters(), *prior.named_buffers()]}
    with on_device(prior, "meta") as model:
        assert model is prior
        assert all(t.device.type == "meta" for t in [*prior.parameters(), *prior.buffers()])
    after = dict([*prior.named_parameters(), *prior.named_buffers()])
    assert all(after[name].data.data_ptr() == t.data_ptr() for name, t in host.items())
    with pytest.raises(RuntimeError, match="inside"), on_device(prior, "meta"):
        raise RuntimeError("failure inside the block")
    assert all(t.device.type == "cpu" for t in prior.parameters())  # restored on errors too


def test_on_device_is_a_no_op_on_the_cpu_and_for_resident_models():
    prior = tiny_prior()
    before = [t.data_ptr() for t in prior.parameters()]
    with on_device(prior, "cpu"):
        assert [t.data_ptr() for t in prior.parameters()] == before
    meta_prior = tiny_prior().to("meta")
    with on_device(meta_prior, "meta"):  # already there: nothing moves
        assert all(t.device.type == "meta" for t in meta_prior.parameters())


def test_on_device_streams_parts_one_at_a_time():
    """stream: each part is on the device only during its own forward; the rest for the whole block."""
    parts = [torch.nn.Linear(4, 4) for _ in range(3)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), *parts)
    head = model[0]
    seen = []
    for part in parts:
        part.register_forward_hook(lambda *_: seen.append((head.weight.device.type,
                                                           [p.weight.device.type for p in parts])))
    host = [t.data_ptr() for t in model.parameters()]
    with torch.no_grad(), on_device(model, "meta", stream=parts):
        assert head.weight.device.type == "meta" and all(p.weight.device.type == "cpu" for p in parts)
        assert model(torch.zeros(2, 4, device="meta")).device.type == "meta"
        assert all(p.weight.device.type == "cpu" for p in parts)  # dropped again after their forward
    assert seen == [("meta", ["meta", "cpu", "cpu"]), ("meta", ["cpu", "meta", "cpu"]),
                    ("meta", ["cpu", "cpu", "meta"])]
    assert [t.data_ptr() for t in model.parameters()] == host  # the host tensors are back
    assert all(not p._forward_pre_hooks and len(p._forward_hooks) == 1 for p in parts)  # only the test's hook is left


@pytest.mark.parametrize("kind", ["prior", "decoder"])
@torch.no_grad()
def test_conditioning_layers_run_once_per_run_and_never_in_a_step(kind):
    """Low-VRAM streams conditioning_layers: right only if condition() runs each of them once and the
    step (forward with the prepared cond) none of them."""
    model = tiny_prior() if kind == "prior" else tiny_decoder().fold_effnet()
    calls = []
    for layer in model.conditioning_layers:
        layer.register_forward_hook(lambda m, *_: calls.append(m))
    if kind == "prior":
        x, r, clip = prior_inputs(model)
        cond = model.condition(clip)
    else:
        x, r, effnet, clip = decoder_inputs(model)
        cond = model.condition(effnet, clip, x.shape[-2:])
    assert sorted(map(id, calls)) == sorted(map(id, model.conditioning_layers))
    calls.clear()
    model(x, r, cond=cond)
    assert calls == []
    streamed = {id(t) for layer in model.conditioning_layers for t in layer.parameters()}
    assert sum(t.numel() for t in model.parameters() if id(t) in streamed) > 0


def test_text_encoder_streams_everything_but_its_final_norm():
    from tests.helpers.tiny_text import tiny_text_encoder

    text = tiny_text_encoder()
    streamed = {id(t) for part in text.layers for t in part.parameters()}
    rest = [n for n, t in text.model.named_parameters() if id(t) not in streamed]
    assert rest and all(n.split(".")[-2] == "final_layer_norm" for n in rest)
    assert text.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# fp8 weight storage


def test_fp8_storage_converts_only_linear_weights_and_computes_with_the_rounded_weights():
    prior = tiny_prior()
    linear = next(m for m in prior.modules() if type(m) is torch.nn.Linear)
    rounded = linear.weight.detach().to(torch.float8_e4m3fn).float()
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    args = prior_inputs(prior)
    with torch.no_grad():
        store_linear_weights_in_fp8(prior)
        assert torch.equal(linear(x), torch.nn.functional.linear(x, rounded, linear.bias))
        assert torch.isfinite(prior(*args)).all()
    linears = [m for m in prior.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Fp8Linear and m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert all(m.bias.dtype == torch.float32 for m in linears)
    assert all(p.dtype == torch.float32 for n, p in prior.named_parameters() if "depthwise" in n)


def test_a_stage_given_a_dtype_keeps_the_fp8_weight_storage():
    """The pipeline's device/dtype arguments cast the compute dtype only: the first GPU run found a
    stage given device "cuda" for a model on "cuda:0" re-casting the whole model, fp8 Linears included."""
    prior = store_linear_weights_in_fp8(tiny_prior())
    clip = prior_inputs(prior, batch=1)[2]
    out = pipeline.sample_stage_c(prior, clip, None, height=256, width=256, steps=1, cfg=0.0, device="cpu",
                                  dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    linears = [m for m in prior.modules() if type(m) is Fp8Linear]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert all(p.dtype == torch.bfloat16 for n, p in prior.named_parameters() if "depthwise" in n)


def test_a_device_without_index_matches_every_index_of_its_type():
    on_cuda0 = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert memory.is_on(on_cuda0, "cuda") and memory.is_on(on_cuda0, "cuda:0")
    assert not memory.is_on(on_cuda0, "cuda:1") and not memory.is_on(on_cuda0, "cpu")


# ---------------------------------------------------------------------------------------------
# per-run conditioning


def test_conditioning_prepared_once_gives_the_same_eps():
    """What depends on the text/effnet alone (mapped text tokens, resized effnet, fused weights) is
    computed once per sampling run; each step then gets exactly what the forward would compute."""
    prior, decoder = tiny_prior(), tiny_decoder()
    x, r, clip = prior_inputs(prior)
    xb, rb, effnet, clip_b = decoder_inputs(decoder)
    with torch.no_grad():
        assert torch.equal(prior(x, r, cond=prior.condition(clip)), prior(x, r, clip))
        cond = decoder.condition(effnet, clip_b, xb.shape[-2:])
        assert torch.equal(decoder(xb, rb, cond=cond), decoder(xb, rb, effnet, clip_b))


def test_cfg_denoiser_prepares_the_conditioning_once():
    from wuerstchen_core.sampling import cfg_denoiser
    prepared = []
    eps_fn = cfg_denoiser(lambda x, r, k: x * k, {"c": torch.ones(1)}, {"c": torch.zeros(1)}, 4.0,
                          prepare=lambda k: prepared.append(k["c"]) or k["c"][:, None])
    for _ in range(3):
        eps = eps_fn(torch.full((1, 2), 2.0), torch.ones(1))
    assert len(prepared) == 1 and torch.equal(prepared[0], torch.tensor([1.0, 0.0]))  # cond then uncond
    assert torch.equal(eps, torch.full((1, 2), 8.0))  # lerp(0, 2, 4)


# ---------------------------------------------------------------------------------------------
# fast mode (torch.compile)


@pytest.mark.parametrize("make,inputs", [(tiny_prior, prior_inputs), (tiny_decoder, decoder_inputs)],
                         ids=["prior", "decoder"])
def test_networks_trace_as_one_graph(make, inputs):
    """Fast mode compiles with fullgraph=True: any graph break (an in-place op, a Python-side branch on a
    tensor) would make it fail. The 'eager' backend traces exactly like inductor but compiles nothing."""
    net = make()
    args = inputs(net)
    with torch.inference_mode():
        expected = net(*args)
        compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(compiled(*args), expected)
        cond = net.condition(args[-1]) if len(args) == 3 else net.condition(*args[2:], args[0].shape[-2:])
        assert torch.equal(compiled(*args[:2], cond=cond), expected)  # as the pipeline calls it


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


def test_sampler_fast_mode_compiles_once_and_matches_eager(models_dir, monkeypatch):
    """The real compile_model (inductor, on the CPU: no CUDA graphs) through the Stage C sampler node."""
    host = StandaloneHost(str(models_dir), on_progress=lambda *a: None)
    prior = loaders.LOAD_PRIOR.execute(host, FILES["prior"], "auto")[0]
    text = loaders.LOAD_TEXT_ENCODER.execute(host, FILES["bigG"], "bigG (Stage C)", "auto")[0]
    pos, neg = (conditioning.TEXT_ENCODE.execute(host, text, t)[0] for t in ("a red cube", ""))
    latent = latents.EMPTY_LATENT.execute(host, 256, 256, 1).outputs[0]
    calls = []
    real = performance.compile_model
    monkeypatch.setattr(performance, "compile_model", lambda *a, **k: calls.append(k) or real(*a, **k))

    def run(fast):
        return sampling.STAGE_C_SAMPLER.execute(host, prior, pos, neg, latent, seed=3, steps=2, cfg=4.0,
                                                sampler="ddpm", denoise=1.0, fast_mode=fast)[0]["samples"]

    eager = run(False)
    assert calls == [] and prior.compiled is None
    fast = run(True)
    fast_again = run(True)
    assert calls == [{"cuda_graphs": False}]  # compiled once, kept with the loaded model
    assert torch.equal(fast, fast_again)
    assert (fast - eager).abs().max() <= 1e-3 * eager.abs().max()  # inductor fuses and reorders float sums


def test_fast_mode_compiles_each_unit_shape_once_for_all_units(fake_cuda_graphs, monkeypatch):
    """Fast mode compiles the networks' units, not the networks: Stage C's (ResBlock, TimestepBlock,
    AttnBlock) triples share one graph per size (the whole-network compile traced each of them), Stage B
    one per distinct unit of its levels. On CUDA a step, compiled units included, is captured and replayed
    (here the stand-in graph); the steps equal the same compiled units run without capture."""
    from torch._dynamo.utils import counters

    prior, decoder = tiny_prior(), tiny_decoder().fold_effnet()
    x, r, clip = prior_inputs(prior)
    compiled, unit_calls = performance.compiled_unit(), []
    monkeypatch.setattr(performance, "compiled_unit", lambda: lambda *a: unit_calls.append(a[0]) or compiled(*a))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), performance.compile_errors("test"):
        cond = prior.condition(clip)
        eager = prior(x, r, cond=cond)
        fast = performance.compile_model(prior)
        assert isinstance(fast, performance.CompiledNetwork) and fast.cfg is prior.cfg
        got = fast(x, r, cond=cond)
        assert (got - eager).abs().max() <= 1e-3 * eager.abs().max()  # inductor fuses and reorders float sums
        assert counters["stats"]["unique_graphs"] == 1 and len(unit_calls) == 2 * prior.cfg.depth  # capture + replay
        assert all(len(unit) == 3 for unit in unit_calls)  # (ResBlock, TimestepBlock, AttnBlock)
        assert fake_cuda_graphs == [tuple(x.shape)]
        unbatched = performance.compile_model(prior, cuda_graphs=False)(x, r, cond=cond)
        assert torch.equal(got, unbatched) and len(fake_cuda_graphs) == 1  # no capture without CUDA graphs

        counters.clear()
        clip_b = torch.randn(2, 77, decoder.cfg.clip_embd, generator=torch.Generator().manual_seed(1))
        effnet = torch.randn(2, decoder.cfg.effnet_embd, 3, 3, generator=torch.Generator().manual_seed(2))
        xb, rb = torch.randn(2, decoder.cfg.c_in, 32, 32, generator=torch.Generator().manual_seed(3)), r
        cond_b = decoder.condition(effnet, clip_b, xb.shape[-2:])
        eager_b = decoder(xb, rb, cond=cond_b)
        units = []
        decoder(xb, rb, cond=cond_b, run_unit=lambda blocks, h, a: units.append(blocks) or run_unit(blocks, h, a))
        got_b = performance.compile_model(decoder)(xb, rb, cond=cond_b)
    assert (got_b - eager_b).abs().max() <= 1e-3 * eager_b.abs().max()
    assert sum(len(unit) for unit in units) == sum(len(level) for level in [*decoder.down_blocks, *decoder.up_blocks])
    assert 1 < counters["stats"]["unique_graphs"] < len(units)  # a graph per kind of unit, shared by alike units


def test_fast_mode_announces_the_first_run_of_each_input_shape(monkeypatch, caplog):
    """A first fast-mode run compiles for up to minutes with the sampler at step 0: each network logs it
    (INFO, which ComfyUI's console shows) once per input shape, with the time it took, and stays quiet
    for the runs after it. The compile itself is replaced by the eager units here (tested above)."""
    monkeypatch.setattr(performance, "compiled_unit", lambda: run_unit)
    prior, vqgan = tiny_prior(), tiny_vqgan()
    x, r, clip = prior_inputs(prior)
    z = torch.randn(1, vqgan.cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    fast_prior, fast_vqgan = performance.compile_model(prior, cuda_graphs=False), performance.compile_model(vqgan)
    with caplog.at_level(logging.INFO, logger="wuerstchen_core"), torch.no_grad():
        cond = prior.condition(clip)
        first, again = fast_prior(x, r, cond=cond), fast_prior(x, r, cond=cond)
        fast_prior(x[:1], r[:1], cond=prior.condition(clip[:1]))
        decoded, decoded_again = fast_vqgan.decode(z), fast_vqgan.decode(z)
    assert torch.equal(first, prior(x, r, cond=cond)) and torch.equal(first, again)
    assert torch.equal(decoded, vqgan.decode(z)) and torch.equal(decoded, decoded_again)
    messages = [record.getMessage() for record in caplog.records if record.name == "wuerstchen_core.performance"]
    shape = "×".join(map(str, x.shape))
    assert [m.split(" for input ")[0] for m in messages] == [
        "Würstchen fast mode: preparing the Stage C prior", "Würstchen fast mode: the Stage C prior",
        "Würstchen fast mode: preparing the Stage C prior", "Würstchen fast mode: the Stage C prior",
        "Würstchen fast mode: preparing Stage A's blocks", "Würstchen fast mode: Stage A's blocks"]
    assert f"for input {shape} (it compiles on the first run" in messages[0]
    assert re.search(rf"for input {shape} ready after \d+\.\d s$", messages[1])
    assert f"for input 1×{shape.split('×', 1)[1]} (" in messages[2]


def test_stage_a_fast_mode_compiles_one_graph_per_block_shape_and_matches_eager(models_dir, monkeypatch):
    """The Stage A Decode node's fast_mode: the VQGAN's blocks run through one inductor-compiled function
    (kept with the loaded model), shared by the identical bottleneck blocks, and its banded channel mixing
    (the compile-only cat form) decodes what the eager out= bands decode."""
    from torch._dynamo.utils import counters

    from wuerstchen_core.models.vqgan import MixingResidualBlock

    host = StandaloneHost(str(models_dir), on_progress=lambda *a: None)
    vqgan = loaders.LOAD_VQGAN.execute(host, FILES["vqgan"], "fp32")[0]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    samples = latents.make_latent(z, "B", host)
    monkeypatch.setattr(MixingResidualBlock, "MAX_TOKENS", 128)  # bands of 4 rows at the 32 px level, 8 at 16 px
    calls = []
    real = performance.compile_model
    monkeypatch.setattr(performance, "compile_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))

    eager = image.STAGE_A_DECODE.execute(host, vqgan, samples, 0, fast_mode=False)[0]
    assert calls == [] and vqgan.compiled is None
    torch._dynamo.reset()
    counters.clear()
    fast = image.STAGE_A_DECODE.execute(host, vqgan, samples, 0, fast_mode=True)[0]
    fast_again = image.STAGE_A_DECODE.execute(host, vqgan, samples, 0, fast_mode=True)[0]
    blocks = [b for b in vqgan.model.up_blocks if isinstance(b, MixingResidualBlock)]
    assert len(blocks) == 3 and calls == [vqgan.model]  # compiled once, kept with the loaded model
    assert isinstance(vqgan.compiled, performance.CompiledVQGAN)
    assert counters["stats"]["unique_graphs"] == 2  # one per block shape: the two bottleneck blocks share one
    assert torch.equal(fast, fast_again)
    assert (fast - eager).abs().max() <= 1e-5  # images in 0..1; inductor fuses and reorders float sums


def test_fast_mode_compiles_past_dynamos_shape_limit_then_says_when_it_stops(monkeypatch):
    """Every new image size or batch compiles fast mode's unit function once more per unit shape, all of it
    one function's compiles to dynamo; with fullgraph=True dynamo's default limit (8 per function, 256 in
    all) would end fast mode with a bare FailOnRecompileLimitHit at the ninth."""
    limit = performance.recompile_limit_setting()
    default, default_total = getattr(torch._dynamo.config, limit), getattr(torch._dynamo.config, f"accumulated_{limit}")
    double = torch.compile(lambda x: x * 2, fullgraph=True, dynamic=False, backend="eager")
    with performance.compile_errors("Würstchen Stage C Sampler"):
        assert getattr(torch._dynamo.config, f"accumulated_{limit}") >= performance.FAST_MODE_SHAPES * 13
        for n in range(1, default + 3):
            assert torch.equal(double(torch.ones(n)), torch.full((n,), 2.0))
    assert getattr(torch._dynamo.config, limit) == default  # the host's settings, back after the block
    assert getattr(torch._dynamo.config, f"accumulated_{limit}") == default_total
    monkeypatch.setattr(performance, "FAST_MODE_SHAPES", 3)
    monkeypatch.setattr(performance, "UNIT_GRAPHS", (default + 4) // 3 + 1)  # a limit of default + 4 at most
    with pytest.raises(WuerstchenError, match="^Würstchen Stage C Sampler: fast mode has compiled the networks for "
                                              "about 3 image sizes and batches in this session"):
        with performance.compile_errors("Würstchen Stage C Sampler"):
            for n in range(default + 3, default + 3 + 3 * performance.UNIT_GRAPHS):
                double(torch.ones(n))


def no_compiler(gm, example_inputs):
    """A torch.compile backend as on a machine without Triton or a C++ compiler."""
    raise RuntimeError("no working C++ compiler found")


def test_a_failing_compile_is_one_clear_error_naming_the_node(models_dir, monkeypatch):
    """No Triton, no C++ compiler: torch.compile fails at the first call; the node says so in a sentence."""
    monkeypatch.setattr(performance, "compiled_unit", lambda: torch.compile(run_unit, backend=no_compiler))
    host = StandaloneHost(str(models_dir), on_progress=lambda *a: None)
    prior = loaders.LOAD_PRIOR.execute(host, FILES["prior"], "auto")[0]
    text = loaders.LOAD_TEXT_ENCODER.execute(host, FILES["bigG"], "bigG (Stage C)", "auto")[0]
    pos = conditioning.TEXT_ENCODE.execute(host, text, "a red cube")[0]
    latent = latents.EMPTY_LATENT.execute(host, 256, 256, 1).outputs[0]
    with pytest.raises(WuerstchenError) as e:
        sampling.STAGE_C_SAMPLER.execute(host, prior, pos, pos, latent, seed=3, steps=1, cfg=4.0, sampler="ddpm",
                                         denoise=1.0, fast_mode=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Würstchen Stage C Sampler: fast mode could not compile")
    assert "no working C++ compiler found" in msg and msg.endswith("or turn fast mode off.")
    out = sampling.STAGE_C_SAMPLER.execute(host, prior, pos, pos, latent, seed=3, steps=1, cfg=4.0, sampler="ddpm",
                                           denoise=1.0, fast_mode=False)[0]  # eager still works
    assert torch.isfinite(out["samples"]).all()


def test_a_compile_failing_before_a_cuda_graph_capture_is_the_compile_error(fake_cuda_graphs, monkeypatch):
    """On CUDA fast mode's units compile in the warm-up runs of the step's capture: a failure there is the
    compile's error, not a failed capture's (which would tell the user to turn CUDA graphs off)."""
    monkeypatch.setattr(performance, "compiled_unit", lambda: torch.compile(run_unit, backend=no_compiler))
    prior = tiny_prior()
    x, r, clip = prior_inputs(prior)
    with pytest.raises(WuerstchenError, match="^Würstchen Stage C Sampler: fast mode could not compile the network"):
        with torch.no_grad(), performance.compile_errors("Würstchen Stage C Sampler"):
            performance.compile_model(prior)(x, r, cond=prior.condition(clip))
    assert fake_cuda_graphs == []


# ---------------------------------------------------------------------------------------------
# CUDA-graph mode (GraphedNetwork)


def _stage_b(decoder, clip, seed, steps=3):
    effnet = torch.randn(1, decoder.cfg.effnet_embd, 3, 3, generator=torch.Generator().manual_seed(seed))
    return pipeline.sample_stage_b(decoder, effnet, clip, seeds=seed, steps=steps)


def test_graphed_runs_equal_eager_runs_and_capture_once_per_shape(fake_cuda_graphs):
    """Two sampling runs with different prompts: the second reuses the first's graph and must see its own
    conditioning (copied into the graph's inputs once per run), or its image would be the first's."""
    decoder = tiny_decoder().fold_effnet()
    graphed = performance.GraphedNetwork(decoder)
    clips = [torch.randn(1, 77, decoder.cfg.clip_embd, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    eager = [_stage_b(decoder, clip, seed) for seed, clip in enumerate(clips)]
    replayed = [_stage_b(graphed, clip, seed) for seed, clip in enumerate(clips)]
    assert not torch.equal(eager[0], eager[1])
    for want, got in zip(eager, replayed):
        assert torch.equal(got, want)
    assert len(fake_cuda_graphs) == 1  # one shape, captured once for both runs
    prior = tiny_prior()
    x, r, clip = prior_inputs(prior)
    with torch.no_grad():
        graphed_prior = performance.GraphedNetwork(prior)
        cond = prior.condition(clip)
        for batch in (2, 1, 2):
            assert torch.equal(graphed_prior(x[:batch], r[:batch], cond=[t[:batch] for t in cond]),
                               prior(x[:batch], r[:batch], cond=[t[:batch] for t in cond]))
    assert fake_cuda_graphs[1:] == [tuple(x.shape), (1, *x.shape[1:])]  # batch 2 captured once, kept


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_graphed_sampling_equals_eager_with_guidance_and_masks(fake_cuda_graphs, sampler):
    """Stage C with guidance (one batched call per step) and every sampler (dpmpp_2m keeps the last x0
    across steps), then Stage B img2img with a mask: each equals its eager run."""
    prior, decoder = tiny_prior(), tiny_decoder().fold_effnet()
    g = torch.Generator().manual_seed(5)
    cond, uncond = (torch.randn(2, 77, prior.cfg.c_cond, generator=g) for _ in range(2))
    clip_b = torch.randn(2, 77, decoder.cfg.clip_embd, generator=g)
    effnet = torch.randn(2, decoder.cfg.effnet_embd, 3, 3, generator=g)
    start, mask = torch.randn(2, decoder.cfg.c_in, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g) > 0.5

    def run(c_net, b_net):
        c = pipeline.sample_stage_c(c_net, cond, uncond, height=384, width=384, seeds=1, steps=4, cfg=4.0,
                                    sampler=sampler)
        b = pipeline.sample_stage_b(b_net, effnet, clip_b, seeds=2, steps=3, sampler=sampler, latent=start,
                                    mask=mask.float(), denoise=0.6)
        return c, b

    eager = run(prior, decoder)
    graphed = run(performance.GraphedNetwork(prior), performance.GraphedNetwork(decoder))
    for want, got in zip(eager, graphed):
        assert torch.equal(got, want)
    assert len(fake_cuda_graphs) == 2


def test_sampler_nodes_cuda_graphs_option(models_dir, fake_cuda_graphs):
    """Both sampler nodes: the same latents as the plain steps, one wrapper kept with the loaded model (a
    second run replays the graph captured by the first), and a clear error with fast_mode also on."""
    host = StandaloneHost(str(models_dir), on_progress=lambda *a: None)
    prior = loaders.LOAD_PRIOR.execute(host, FILES["prior"], "auto")[0]
    decoder = loaders.LOAD_DECODER.execute(host, FILES["decoder"], "auto")[0]
    text_c = loaders.LOAD_TEXT_ENCODER.execute(host, FILES["bigG"], "bigG (Stage C)", "auto")[0]
    text_b = loaders.LOAD_TEXT_ENCODER.execute(host, FILES["H"], "H (Stage B)", "auto")[0]
    pos_c, neg_c = (conditioning.TEXT_ENCODE.execute(host, text_c, t)[0] for t in ("a red cube", ""))
    pos_b = conditioning.TEXT_ENCODE.execute(host, text_b, "a red cube")[0]
    latent = latents.EMPTY_LATENT.execute(host, 256, 256, 1).outputs[0]

    def run(**speed):
        c = sampling.STAGE_C_SAMPLER.execute(host, prior, pos_c, neg_c, latent, seed=3, steps=2, cfg=4.0,
                                             sampler="ddpm", denoise=1.0, **speed)[0]
        b = sampling.STAGE_B_SAMPLER.execute(host, decoder, pos_b, pos_b, c, seed=3, steps=2, cfg=0.0,
                                             sampler="ddpm", denoise=1.0, **speed)[0]
        return c["samples"], b["samples"]

    eager = run()
    assert fake_cuda_graphs == [] and prior.graphed is None
    for _ in range(2):
        for want, got in zip(eager, run(cuda_graphs=True)):
            assert torch.equal(got, want)
    assert len(fake_cuda_graphs) == 2 and prior.graphed is not None and decoder.graphed is not None
    with pytest.raises(WuerstchenError, match=r"^Würstchen Stage C Sampler: fast_mode and cuda_graphs are both on; "
                                              r"expected at most one"):
        run(fast_mode=True, cuda_graphs=True)


def test_graphed_network_over_fp8_stored_weights(fake_cuda_graphs):
    """--fp8 with --cuda-graphs: the per-call weight casts are part of the captured step."""
    prior = store_linear_weights_in_fp8(tiny_prior())
    x, r, clip = prior_inputs(prior)
    with torch.no_grad():
        cond = prior.condition(clip)
        graphed = performance.GraphedNetwork(prior)
        for _ in range(2):
            assert torch.equal(graphed(x, r, cond=cond), prior(x, r, cond=cond))
    assert len(fake_cuda_graphs) == 1


def test_a_failing_capture_is_one_clear_error(monkeypatch, fake_cuda_graphs):
    def refuse(step, device, pool=None):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(performance, "capture_cuda_graph", refuse)
    prior = tiny_prior()
    x, r, clip = prior_inputs(prior)
    graphed = performance.GraphedNetwork(prior)
    with torch.no_grad(), pytest.raises(WuerstchenError) as e:
        graphed(x, r, cond=prior.condition(clip))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("CUDA graphs: capturing a WuerstchenPrior step of shape (2, 4, 6, 6) "
                                              "failed (RuntimeError: CUDA error: operation not permitted")
    assert msg.endswith("or turn cuda_graphs / --cuda-graphs off.") and not graphed._graphs
    monkeypatch.setattr(performance, "capture_cuda_graph", lambda *a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):  # as it is: ComfyUI frees memory and says so
        performance.compile_model(prior)(x, r, cond=prior.condition(clip))


def test_graphs_are_dropped_when_the_weights_move_or_change():
    """A graph reads the weights at their captured addresses: after a cast (the fp16 fallback), an offload
    round trip (data swapped in place), a new tensor in a module's slot (fp8 storage, a patched weight) or a
    moved buffer they live elsewhere, and replaying would read freed memory."""
    prior = tiny_prior()
    prior.register_buffer("scale", torch.ones(3))
    graphed = performance.GraphedNetwork(prior)
    x, r, clip = prior_inputs(prior)
    with torch.no_grad():
        cond = prior.condition(clip)

        def kept_after(change) -> bool:
            graphed._graphs["some shape"] = "a captured graph"
            change()
            graphed._new_run(prior.condition(clip.to(prior.out[1].weight.dtype)))
            return list(graphed._graphs) == ["some shape"]

        graphed._new_run(cond)
        assert kept_after(lambda: None)  # same weights
        assert not kept_after(lambda: setattr(prior.out[1].weight, "data", prior.out[1].weight.data.clone()))
        assert not kept_after(lambda: setattr(prior.out[1], "weight", torch.nn.Parameter(prior.out[1].weight * 1)))
        assert not kept_after(lambda: setattr(prior, "scale", prior.scale.clone()))
        assert not kept_after(lambda: store_linear_weights_in_fp8(prior))
        assert not kept_after(lambda: prior.to(torch.float64))


def test_graphed_network_keeps_at_most_max_graphs(fake_cuda_graphs):
    prior = tiny_prior()
    graphed = performance.GraphedNetwork(prior, max_graphs=2)
    with torch.no_grad():
        cond = prior.condition(prior_inputs(prior)[2])
        inputs = [(torch.randn(2, prior.cfg.c_in, size, size), torch.rand(2)) for size in (4, 5, 6, 4, 4)]
        outputs = [graphed(x, r, cond=cond) for x, r in inputs]  # each stays valid after later replays
        for (x, r), out in zip(inputs, outputs):
            assert torch.equal(out, prior(x, r, cond=cond))
    assert len(graphed._graphs) == 2 and [s[-1] for s in fake_cuda_graphs] == [4, 5, 6, 4]


def test_graphed_network_runs_eager_where_it_cannot_capture(fake_cuda_graphs):
    """Without a prepared cond, with autograd on, or on a device without CUDA graphs: the plain forward."""
    prior = tiny_prior()
    graphed = performance.GraphedNetwork(prior)
    x, r, clip = prior_inputs(prior)
    assert graphed.cfg is prior.cfg and graphed.conditioning_layers == prior.conditioning_layers
    with torch.no_grad():
        assert torch.equal(graphed(x, r, clip), prior(x, r, clip))
    assert torch.equal(graphed(x, r, cond=prior.condition(clip)), prior(x, r, cond=prior.condition(clip)))
    assert fake_cuda_graphs == []


def test_graphed_network_is_eager_on_the_cpu_without_the_stand_in():
    prior = tiny_prior()
    graphed = performance.GraphedNetwork(prior)
    x, r, clip = prior_inputs(prior)
    with torch.no_grad():
        cond = prior.condition(clip)
        assert torch.equal(graphed(x, r, cond=cond), prior(x, r, cond=cond))
    assert not graphed._graphs


# ---------------------------------------------------------------------------------------------
# fp8 matmul (fp8_e4m3fn_fast)


def _emulated_fp8_linear(x, weight, bias):
    """fp8_linear's arithmetic spelled out in float32: per-row scale to 448, e4m3 rounding, rescale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny) / 448
    q = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return ((q @ weight.float().t()) * scale).to(torch.bfloat16).to(x.dtype) + bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_matmul_scales_each_row_into_e4m3_and_rescales_the_product(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g) * torch.logspace(-3, 3, 40)[:, None]  # rows from 1e-3 to 1e3
    x[3] = 0
    x = x.to(dtype)
    weight = (torch.randn(48, 64, generator=g) * 0.05).to(torch.float8_e4m3fn)
    bias = torch.randn(48, generator=g).to(dtype)
    out = performance.fp8_linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (40, 48)
    torch.testing.assert_close(out, _emulated_fp8_linear(x, weight, bias), rtol=1e-2, atol=1e-2)
    assert torch.equal(out[3], bias)  # an all-zero row: the bias alone, not NaN
    exact = x.float() @ weight.float().t() + bias.float()
    err = (out.float() - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)
    assert err.max() < 0.08  # each row keeps e4m3's relative precision at its own magnitude


def test_fp8_fast_linears_multiply_in_fp8_where_their_sizes_allow(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].shape) or scaled_mm(*a, **k))
    prior = tiny_prior()
    args = prior_inputs(prior)
    with torch.no_grad():
        stored = store_linear_weights_in_fp8(tiny_prior())(*args)
        assert calls == []  # fp8 storage alone multiplies in the compute dtype
        store_linear_weights_in_fp8(prior, matmul=True)
        fast = prior(*args)
    linears = [m for m in prior.modules() if type(m) is Fp8Linear]
    eligible = [m for m in linears if m.in_features % 16 == 0 and m.out_features % 16 == 0]
    assert all(m.fp8_matmul for m in linears) and 0 < len(eligible) < len(linears)
    assert len(calls) >= len(eligible)  # every eligible Linear ran as an fp8 matmul (some run twice per step)
    assert torch.isfinite(fast).all() and not torch.equal(fast, stored)
    store_linear_weights_in_fp8(prior)  # back to storage only: no fp8 matmul
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(prior(*args), stored, rtol=0, atol=0)
    assert calls == []


def test_fp8_fast_compiles():
    linear = store_linear_weights_in_fp8(torch.nn.Sequential(torch.nn.Linear(64, 32)), matmul=True)
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, compiled = linear(x), performance.compiled_unit()((linear,), x, ((),))  # as fast mode runs units
    assert (compiled - eager).abs().max() <= 0.07 * eager.abs().max()  # e4m3 rounding may differ by a step


def test_fp8_matmul_on_a_gpu_older_than_hopper_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3070")
    performance._hopper_or_newer.cache_clear()
    try:
        with pytest.raises(WuerstchenError, match="RTX 3070.*compute capability 9.0.*fp8_e4m3fn"):
            performance.check_fp8_matmul_device(torch.device("cuda", 0))
        performance.check_fp8_matmul_device(torch.device("cpu"))
    finally:
        performance._hopper_or_newer.cache_clear()  # not this fake GPU's answer for later tests
