"""wuerstchen_core/kernels.py (GELU + GRN as Triton kernels) and its switch, performance.fuse_gelu_grn.

The switch and the blocks' dispatch are tested everywhere. The kernels themselves need triton, which CPU
torch wheels do not bring (CI): where it is importable they run here in Triton's interpreter and are built
for an H100/H200 (sm_90) with the ptxas that ships in the triton wheel, no GPU needed."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.tiny_models import tiny_prior
from tests.test_performance import prior_inputs
from wuerstchen_core import performance
from wuerstchen_core.errors import WuerstchenError
from wuerstchen_core.models.common import ChannelMLP, GlobalResponseNorm, grn_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_MISSING = ("triton is not installed (CPU torch wheels do not bring it): the Triton kernels are checked only "
                  "where triton is importable")


@pytest.fixture
def fusion_off():
    yield
    ChannelMLP.fused_gelu_grn.clear()


def test_blocks_hand_gelu_grn_to_the_installed_kernel_and_keep_their_keys(fusion_off):
    """With a kernel installed for the device type, every channel MLP calls it once with the first Linear's
    output as [B, N, 4c] and the GRN's own parameters, and feeds its result to the second Linear; the state
    dict is the same either way. Installed for another device type, nothing changes."""
    prior = tiny_prior()
    keys = list(prior.state_dict())
    calls = []

    def kernel(u, gamma, beta):  # the eager arithmetic, through the plain modules' own code
        calls.append((tuple(u.shape), gamma, beta))
        grn = next(m for m in prior.modules() if isinstance(m, GlobalResponseNorm) and m.gamma is gamma)
        return grn(torch.nn.functional.gelu(u.unsqueeze(2))).squeeze(2) * 2  # ×2: a visible change

    with torch.no_grad():
        plain = prior(*prior_inputs(prior))
        ChannelMLP.fused_gelu_grn["meta"] = kernel
        assert torch.equal(prior(*prior_inputs(prior)), plain) and not calls
        ChannelMLP.fused_gelu_grn["cpu"] = kernel
        fused = prior(*prior_inputs(prior))
    mlps = [m for m in prior.modules() if isinstance(m, ChannelMLP)]
    assert len(calls) == len(mlps) > 0 and list(prior.state_dict()) == keys
    batch, _, h, w = prior_inputs(prior)[0].shape
    assert {c[0] for c in calls} == {(batch, h * w, mlps[0][0].out_features)}
    assert not torch.equal(fused, plain)


@torch.library.custom_op("wuerstchen_test::doubled_gelu_grn", mutates_args=())
def doubled_gelu_grn(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A stand-in for kernels.gelu_grn, opaque to the compiler like the real one: twice the eager GRN(GELU(u)),
    so a network that skips it shows."""
    x = torch.nn.functional.gelu(u)
    scale = grn_scale(torch.linalg.vector_norm(x, dim=1, keepdim=True), gamma.reshape(-1))
    return 2 * torch.addcmul(beta.reshape(-1), x, scale)


@doubled_gelu_grn.register_fake
def _(u, gamma, beta):
    return torch.empty_like(u)


def test_fast_mode_compiles_the_fused_blocks_whole(fusion_off):
    """Fast mode's torch.compile (fullgraph) traces the dispatch to an installed kernel op, and the compiled
    network computes what the eager one with the same op does (up to compiled-vs-eager rounding, which this
    tiny random network amplifies to ≈ 1e-4 even unfused). The prior only: both networks' blocks dispatch in
    ChannelMLP, and a second compile would double the test's time."""
    prior = tiny_prior()
    inputs = prior_inputs(prior)
    with torch.no_grad():
        plain = prior(*inputs)
        ChannelMLP.fused_gelu_grn["cpu"] = doubled_gelu_grn
        torch._dynamo.reset()
        eager = prior(*inputs)
        compiled = performance.compile_model(prior, cuda_graphs=False)(*inputs)
    assert (compiled - eager).abs().max() <= 1e-3 * eager.abs().max()
    assert (plain - eager).abs().max() > 0.1 * eager.abs().max()  # the op is really in the graph


def test_fuse_gelu_grn_switches_on_and_off_and_says_when_triton_is_missing(fusion_off, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "wuerstchen_core.kernels", raising=False)
    with pytest.raises(WuerstchenError, match="fused GELU \\+ GRN kernels need triton .*leave the fusion off"):
        performance.fuse_gelu_grn(True)
    assert ChannelMLP.fused_gelu_grn == {}
    ChannelMLP.fused_gelu_grn["cuda"] = object()
    performance.fuse_gelu_grn(False)
    assert ChannelMLP.fused_gelu_grn == {}


INTERPRETED = """
import torch
import block_variants as variants
from tests.helpers.tiny_models import tiny_decoder, tiny_prior
from tests.test_performance import decoder_inputs, prior_inputs
from wuerstchen_core import performance
from wuerstchen_core.kernels import gelu_grn, row_splits
from wuerstchen_core.models.common import GlobalResponseNorm

torch.manual_seed(0)
assert row_splits(1, 70, 64) == (3, 32) and row_splits(2, 36, 96)[0] == 2  # the shapes below split their rows
for dtype in (torch.float32, torch.float16):
    # 1100 channels take two passes of the scale kernel and nine channel blocks of the reduction
    for shape in ((2, 36, 96), (3, 100, 200), (1, 70, 64), (2, 300, 1100)):
        batch, n, c = shape
        grn = GlobalResponseNorm(c)
        with torch.no_grad():
            grn.gamma.normal_()
            grn.beta.normal_()
            grn = grn.to(dtype)
            u = (torch.randn(shape) * 2).to(dtype)
            expected = grn(torch.nn.functional.gelu(u.view(batch, n, 1, c))).view(shape).float()
            got = gelu_grn(u, grn.gamma, grn.beta).float()
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < (1e-6 if dtype == torch.float32 else 1e-4), (dtype, shape, err)
        if dtype == torch.float16:  # rounded as the eager ops round: a few outputs an ulp apart at most
            assert (got != expected).float().mean() < 1e-3, (shape, (got != expected).float().mean())

prior, decoder = tiny_prior(), tiny_decoder().fold_effnet()
with torch.no_grad():
    plain = prior(*prior_inputs(prior)), decoder(*decoder_inputs(decoder))
    performance.fuse_gelu_grn(True, ("cpu",))
    fused = prior(*prior_inputs(prior)), decoder(*decoder_inputs(decoder))
    performance.fuse_gelu_grn(False)
    flags = {layout: layout == "grn_triton" for layout in variants.LAYOUTS}
    with variants.variant(flags, flags):  # the bench's block form with the same kernels
        form = prior(*prior_inputs(prior)), decoder(*decoder_inputs(decoder))
for a, b, f in zip(plain, fused, form):
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-5)
print("interpreted ok")
"""


HOPPER_BUILD = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wuerstchen_core import kernels

hopper = GPUTarget("cuda", 90, 32)
fixed = triton.Config({}, num_warps=4)
# each kernel's runtime arguments, all marked divisible by 16 as a launch on aligned tensors with such sizes
# specialises them; its compile-time arguments; the tiles it may run with (in fp16 and bf16 models)
assert len(kernels._apply.configs) > 1, "outside the interpreter the apply pass has tiles to choose from"
for half in ("fp16", "bf16"):
    builds = [
        (kernels._sum_squares, {"u_ptr": "*" + half, "part_ptr": "*fp32", "N": "i32", "C": "i32"},
         {"ROWS_PER_SPLIT": 1280, "BLOCK_N": kernels.REDUCE_ROWS, "BLOCK_C": kernels.REDUCE_CHANNELS}, [fixed]),
        (kernels._scale, {"part_ptr": "*fp32", "gamma_ptr": "*" + half, "scale_ptr": "*" + half},
         {"C": 6144, "SPLITS": 2, "BLOCK_C": kernels.SCALE_CHANNELS}, [fixed]),
        (kernels._apply.fn, {"u_ptr": "*" + half, "scale_ptr": "*" + half, "beta_ptr": "*" + half,
                             "out_ptr": "*" + half, "N": "i32", "C": "i32", "R": "i32"}, {}, kernels._apply.configs),
    ]
    for fn, args, constants, tiles in builds:
        for tile in tiles:
            constexprs = {**constants, **tile.kwargs}
            source = ASTSource(fn=fn, signature={**args, **{name: "constexpr" for name in constexprs}},
                               constexprs=constexprs,
                               attrs={(i,): [["tt.divisibility", 16]] for i in range(len(args))})
            ptx = triton.compile(source, target=hopper, options=dict(num_warps=tile.num_warps)).asm["ptx"]
            loads = set(re.findall(r"ld[.]global[.]\\S*", ptx))
            assert "ld.global.v4.b32" in loads, (half, fn, tile, loads)  # 16-byte loads
            if fn is kernels._sum_squares:  # the map itself: nothing narrower
                assert loads == {"ld.global.v4.b32"}, (half, loads)
print("hopper build ok")
"""


def _run(script: str, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "bench"), ROOT,
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason=TRITON_MISSING)
def test_kernels_compute_the_eager_gelu_grn_in_the_interpreter():
    """The kernels give the eager GELU + GRN (fp32 to rounding, fp16 within an ulp on a few outputs), rows
    split over several programs or not; the networks with the fusion switched on (and the bench's grn_triton
    block form) compute what the plain networks compute."""
    done = _run(INTERPRETED, interpret=True)
    assert done.returncode == 0 and "interpreted ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason=TRITON_MISSING)
def test_kernels_build_for_hopper_with_wide_loads():
    """Every kernel, in every tile it may run with, compiles for an H100/H200 (sm_90) and reads in 16-byte
    loads: a kernel that fails to build or falls back to 2-byte loads fails here, not in a scarce GPU run."""
    done = _run(HOPPER_BUILD, interpret=False)
    assert done.returncode == 0 and "hopper build ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason=TRITON_MISSING)
@pytest.mark.parametrize("stage, side, batch, guided", [("prior", 1024, 2, True), ("decoder", 1024, 1, False),
                                                        ("decoder", 2048, 1, False)])
def test_stage_estimates_cover_the_fused_kernels_extra_tensor(fusion_off, stage, side, batch, guided):
    """The kernel writes a new 4×-wide tensor where the eager GELU/GRN overwrite theirs, so a fused step peaks
    higher (traced on the meta device at the public sizes: Stage B at 1024² 0.14 against 0.10 GiB); the
    memory estimate that gates each stage still covers it (its factors were measured before GELU/GRN went
    in place)."""
    from bench.memory_predict import public_networks
    from wuerstchen_core import memory

    net = public_networks()[stage]
    plain = memory.trace_stage(net, stage, height=side, width=side, batch=batch, guided=guided)
    performance.fuse_gelu_grn(device_types=("meta",))
    fused = memory.trace_stage(net, stage, height=side, width=side, batch=batch, guided=guided)
    estimate = memory.activation_bytes(stage, net.cfg, batch, side, side, guided=guided)
    assert plain < fused and estimate >= fused + memory.WORKSPACE, (plain, fused, estimate)
