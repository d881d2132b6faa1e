"""GPU memory at the public sizes, predicted on the CPU: `memory.trace_stage` runs each forward on the
meta device and adds up the live tensors op by op (no weights, no compute).

These are predictions, not measurements (no GPU here): a GPU peak adds kernel workspaces, for which
every figure includes memory.WORKSPACE. They pin the memory targets of issue 5 (through
bench/memory_predict.py, which prints the same figures), so a change that raises a stage's peak fails
here, and they check that memory.estimate (which gates every stage on CUDA) covers each traced peak."""

import pytest
import torch

from bench.memory_predict import predict, public_networks
from tests.helpers.tiny_models import tiny_vqgan
from wuerstchen_core import memory
from wuerstchen_core.memory import MemoryEstimate, trace_activations
from wuerstchen_core.models.vqgan import MixingResidualBlock

GiB = 2**30


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.fixture(scope="module")
def public():
    return public_networks()


_PEAKS = {}


def stage_peak(nets, stage: str, side: int, batch: int = 1, guided: bool = False, tile: int | None = None) -> int:
    """memory.trace_stage for nets[stage] at side² px, cached (a public decoder trace takes ~0.5 s)."""
    key = (id(nets[stage]), side, batch, guided, tile)
    if key not in _PEAKS:
        _PEAKS[key] = memory.trace_stage(nets[stage], stage, height=side, width=side, batch=batch, guided=guided,
                                         tile=tile)
    return _PEAKS[key]


# ---------------------------------------------------------------------------------------------
# the tracer itself


def test_trace_counts_each_live_storage_once_and_frees_dead_ones():
    x = meta(1024, dtype=torch.float32)  # 4 KiB, an input: not counted

    def fn():
        a = x * 2  # 4 KiB
        v = a.view(32, 32).t()  # a view: no new storage
        b = torch.cat([a, a])  # 8 KiB: peak 12 KiB
        del a, b
        c = v.sum(0)  # `a` lives on through the view: 4 KiB + 128 B
        c.add_(1)  # in place: nothing new
        return c

    assert trace_activations(fn, [x]) == 12 * 1024


def test_trace_counts_attention_as_a_fused_kernel():
    q = meta(1, 10, 4096, 64)
    peak = trace_activations(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), [q])
    assert peak == q.numel() * 2  # the output only, no 4096×4096 score matrix per head


# ---------------------------------------------------------------------------------------------
# memory.estimate covers every traced peak (the estimate gates each stage on CUDA)

CASES = [("prior", 1024, 1, True, None), ("prior", 2048, 2, True, None), ("decoder", 1024, 1, False, None),
         ("decoder", 2048, 1, False, None), ("decoder", 1024, 2, True, None), ("decoder", 1536, 2, False, None),
         ("vqgan", 1024, 1, False, None), ("vqgan", 1024, 4, False, None), ("vqgan", 2048, 1, False, None),
         ("vqgan", 2048, 1, False, 128), ("vqgan", 1024, 1, False, 128)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_estimate_covers_the_traced_peak(public, case):
    stage, side, batch, guided, tile = case
    traced = stage_peak(public, stage, side, batch, guided, tile)
    est = MemoryEstimate(stage, public[stage].cfg, 0, batch, side, side, guided=guided, tile=tile).activations
    assert est >= traced + memory.WORKSPACE, (est / GiB, traced / GiB)
    if stage == "vqgan":  # the one that decides whether a decode is refused and tiling proposed
        assert est <= 2 * traced, (est / GiB, traced / GiB)


# ---------------------------------------------------------------------------------------------
# the memory targets of issue 5, predicted by bench/memory_predict.py (1024², batch 1, fp16, Stage C
# with CFG; text encoders, Stage C, Stage B, Stage A)


def test_stage_a_decode_no_longer_dominates(public):
    """The channelwise MLP runs over row bands on large maps: a 1024² decode needed 1.03 GiB of
    activations before (traced, and measured on an H200), a 2048² one 4.13 GiB."""
    assert stage_peak(public, "vqgan", 1024) < 0.4 * GiB
    assert stage_peak(public, "vqgan", 2048) < 1.6 * GiB
    assert stage_peak(public, "decoder", 1024) < 0.12 * GiB  # GELU and GRN in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_banded_channel_mlp_is_bit_identical(monkeypatch, dtype):
    """The bands only bound memory: every pixel sees the same operations as in one whole-map call."""
    vqgan = tiny_vqgan().to(dtype)
    z = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        whole = vqgan.decode(z)
        monkeypatch.setattr(MixingResidualBlock, "MAX_TOKENS", 40)  # bands of 1-2 rows
        assert torch.equal(vqgan.decode(z), whole)


def test_decoder_sampling_form_drops_the_effnet_columns():
    """load_decoder folds each injected ResBlock's 1024 effnet columns with the level's mapper: the
    public decoder's weights shrink from 1.97 to 1.58 GiB in fp16 (public_networks holds that form)."""
    from wuerstchen_core.models import DecoderConfig, WuerstchenDecoder
    with torch.device("meta"):
        decoder = WuerstchenDecoder(DecoderConfig()).half()
    full = memory.weight_bytes(decoder)
    assert 1.96 * GiB < full < 1.97 * GiB
    assert full - memory.weight_bytes(decoder.fold_effnet()) > 0.38 * GiB  # 0.385: W_eff·M [4c, 16] stays


def test_all_stages_resident_fit_6_5_gib(public):
    assert predict(public)["all_resident_gib"] <= 6.5


def test_cli_default_frees_the_text_encoders_before_sampling(public):
    """The CLI runs the text encoders first and frees them (tests/test_cli.py checks the order): its
    default peak is Stage B + C + A resident, under 4 GiB at 1024² and under 6 at batch 4 or 2048²."""
    assert predict(public)["cli_default_gib"] < 4.0
    assert predict(public, batch=4)["cli_default_gib"] < 6.0
    assert predict(public, 2048)["cli_default_gib"] < 6.0


def test_2048_fits_under_8_gib_all_resident(public):
    assert predict(public, 2048, tile=128)["all_resident_gib"] < 8
    assert predict(public, 2048)["all_resident_gib"] < 8  # even untiled


def test_low_vram_stage_at_a_time_fits_2_2_gib(public):
    """Each model visits the device alone (text encoders too): the peak is the largest weights + peak."""
    got = predict(public)
    assert got["low_vram_gib"] <= 2.2, got["low_vram_by_stage_gib"]
    assert got["low_vram_gib"] < 1.85  # predicted 1.82: the folded decoder, streamed text and text mappers


def test_fp8_stage_b_and_c_stage_at_a_time_fit_1_4_gib(public):
    fp8 = public_networks(fp8=True)
    assert memory.weight_bytes(fp8["decoder"]) < 0.55 * memory.weight_bytes(public["decoder"])
    got = predict(fp8)  # the per-call fp16 copies of the fp8 weights are traced activations
    assert got["low_vram_gib"] <= 1.4, got["low_vram_by_stage_gib"]
    # the bigG text encoder (1.29 GiB of fp16 weights) would be the largest stage; its layers stream
    assert got["low_vram_by_stage_gib"]["bigG"] < 0.25
    assert got["low_vram_gib"] < 1.0  # Stage C, its text mappers streamed too
