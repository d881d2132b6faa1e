"""The GPU benchmark's code paths, dry-run on the CPU with tiny models: GPU time is scarce, so a bench
that breaks between GPU sessions must fail here, not on the device. (Timings are not checked: speed is
measured by the bench, never asserted in tests.)"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the sections that take seconds on the CPU (fast mode: two tiny compiles); not the long compile experiments
SECTIONS = ["step_sweep", "e2e_eager", "all_resident", "low_vram", "e2e_batch", "low_vram_fp8", "fast_mode", "profile",
            "cuda_graphs", "attention_backends", "grn_layout", "block_variants", "step_variants_b8", "fast_mode_b8_fp8",
            "fast_mode_b8_fused", "whole_compile"]


def _failures(value, where=""):
    """Every "failed: ..." a section recorded (a section or row that raised), with where it sits."""
    if isinstance(value, str):
        return [f"{where}: {value}"] if value.startswith("failed") else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    # attention_backends records the fused kernels a CPU lacks (cuDNN, memory-efficient) as *_error
    return [f for k, v in items if not str(k).endswith("_error") for f in _failures(v, f"{where}/{k}")]


def test_gpu_bench_tiny_dry_run(tmp_path):
    pytest.importorskip("diffusers", reason="the bench's reference rows need diffusers (the test-only oracle)")
    only = ",".join(SECTIONS + ["fast_mode_b8"])  # its row joins fast_mode's
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "--tiny", "--only", only, "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_bench.json").read_text())["sections"]
    assert sorted(sections) == sorted(SECTIONS)
    assert _failures(sections) == []
    assert [row["batch"] for row in sections["fast_mode"]] == [1, 8] and sections["fast_mode"][1]["kernels"]
    assert sections["fast_mode_b8_fused"].startswith("skipped: the Triton kernels need a GPU")
    assert sections["whole_compile"]["s_per_image"] > 0 and sections["whole_compile"]["first_run_compile_s"] > 0
    assert all(row["max_abs_diff"] < 1e-4 * row["max_abs"] for row in sections["grn_layout"])  # one arithmetic
    units = sections["block_variants"]["units"]
    assert [row["stage"] for row in units] == ["Stage C"] + ["Stage B"] * 3
    # every form ran (or does not apply) and computes what the blocks compute
    forms = ("compiled", "transposed", "effnet_split", "stencil_dw")
    assert all(f"{form}_ms" in row or row.get(form) == "n/a" for row in units for form in forms)
    assert all(row[f"{form}_rel_diff"] < 1e-5 for row in units for form in forms if f"{form}_rel_diff" in row)
    assert all(ms > 0 for stage in sections["block_variants"]["estimated_ms"].values() for ms in stage.values())
    assert [row["stage"] for row in sections["step_variants_b8"]][:1] == ["Stage C"]
    assert all("ms" in row for row in sections["step_variants_b8"])
    fp8 = sections["fast_mode_b8_fp8"]
    assert fp8["s_per_image"] > 0 and fp8["stages"]
    for idle in (sections["fast_mode"][1]["idle"], fp8["idle"]):  # every stage's range found in the profile
        assert list(idle) == ["text bigG", "Stage C", "text H", "Stage B", "Stage A", "all stages"]
        assert all(0 < s["busy_ms"] <= s["wall_ms"] and s["largest_gaps"] and s["host_ops"] for s in idle.values())
        assert idle["all stages"]["wall_ms"] >= sum(s["wall_ms"] for name, s in idle.items() if name != "all stages")
    # fp8 weights and activations move the features by a few percent, not nothing and not everything
    assert 1e-3 < fp8["stage_c_features_rel_diff_vs_fp16"] < 0.2 and 1e-3 < fp8["stage_b_features_rel_diff_vs_fp16"] < 0.2
    rows = sections["attention_backends"]
    assert len(rows) == 4 and all(row["flash_max_abs_diff"] == 0 for row in rows)  # the default kernel is flash


def test_chosen_forms_patch_each_stage_blocks_and_compute_the_same(monkeypatch):
    """--chosen-forms: the forms block_variants chose per stage patch Stage C's and Stage B's block
    classes separately, compute what the pack's blocks compute, and are undone afterwards."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import torch

    import block_variants as variants
    from tests.helpers.tiny_models import tiny_decoder, tiny_prior
    from tests.test_performance import decoder_inputs, prior_inputs
    from wuerstchen_core.models.common import ResBlock, ResBlockStageB

    estimated = {"Stage C": {"compiled": 10.0, "transposed": 9.0, "stencil_dw": 9.95},
                 "Stage B": {"compiled": 10.0, "stencil_dw": 8.0, "effnet_split": 10.5}}
    chosen = {stage: variants.layout_flags(variants.chosen_forms(estimated, stage)) for stage in estimated}
    assert chosen == {"Stage C": {"transposed": True, "effnet_split": False, "stencil_dw": False, "grn_triton": False},
                      "Stage B": {"transposed": False, "effnet_split": False, "stencil_dw": True, "grn_triton": False}}
    rivals = variants.chosen_forms({"Stage C": {"compiled": 10.0, "transposed": 9.0, "grn_triton": 8.0}}, "Stage C")
    assert rivals["grn_triton"] and not rivals["transposed"]  # both rewrite the channel MLP: the faster one wins
    prior, decoder = tiny_prior(), tiny_decoder().fold_effnet()
    originals = ResBlock.forward, ResBlockStageB.forward
    with torch.no_grad():
        plain = prior(*prior_inputs(prior)), decoder(*decoder_inputs(decoder))
        with variants.variant(chosen["Stage C"], chosen["Stage B"]):
            assert (ResBlock.forward, ResBlockStageB.forward) != originals
            forms = prior(*prior_inputs(prior)), decoder(*decoder_inputs(decoder))
    assert (ResBlock.forward, ResBlockStageB.forward) == originals
    for a, b in zip(plain, forms):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_idle_timeline_finds_the_gaps_between_device_events(monkeypatch):
    """bench/timeline.py: busy time is the union of overlapping events, idle the rest of the stage's
    range, and each gap names the event that ended before it and the one that started after it."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import timeline

    events = [(0, 400, "gemm"), (100, 300, "nested"), (450, 700, "grn"), (690, 900, "attn"), (3000, 3100, "gemm")]
    got = timeline.window_summary(events, -100, 3500)
    assert got["wall_ms"] == 3.6 and abs(got["busy_ms"] - 0.95) < 1e-9 and abs(got["idle_ms"] - 2.65) < 1e-9
    assert got["largest_gaps"][0] == dict(ms=2.1, after="attn", before="gemm")
    assert got["gaps_over_1ms"] == 1 and abs(got["idle_in_gaps_over_1ms"] - 2.1) < 1e-9
    assert [g["ms"] for g in got["largest_gaps"][1:]] == [0.4, 0.1, 0.05]  # stage end, stage start, 400→450
    assert got["top_kernels"][:2] == [dict(name="gemm", ms=0.5, calls=2), dict(name="grn", ms=0.25, calls=1)]
    # events are clipped to the window; an empty window is all idle
    assert timeline.window_summary(events, 350, 500)["busy_ms"] == 0.1
    assert timeline.window_summary(events, 1000, 2000.5) == dict(
        wall_ms=1.0005, busy_ms=0.0, idle_ms=1.0005, idle_in_gaps_over_1ms=1.0005, gaps_over_1ms=1,
        largest_gaps=[dict(ms=1.0, after="(stage start)", before="(stage end)")], top_kernels=[])
    # the host side: operators that started inside the window, by self time
    host = [("aten::normal_", 10, 700.0), ("aten::normal_", 2000, 900.0), ("aten::copy_", 50, 100.0),
            ("aten::empty", 4000, 5.0)]
    assert timeline.host_ops(host, 0, 3500) == [dict(name="aten::normal_", ms=1.6, calls=2),
                                               dict(name="aten::copy_", ms=0.1, calls=1)]
    assert timeline.host_ops(host, 3500, 3600) == []
