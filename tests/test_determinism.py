"""Issue 4, determinism and isolation: the same seed gives the same image in one process and across
processes, a batch equals its single runs, noise comes from CPU generators (so CPU and GPU runs start
from the same noise), nothing touches the network, and the CLI writes nothing but its outputs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
from tests.helpers.tiny_pack import FILES, write_tiny_models
from tests.helpers.tiny_text import tiny_text_encoder
from tests.test_robustness import one_thread, tiny_workflow  # noqa: F401 (autouse fixture)
from wuerstchen_core import cli, loading, pipeline, sampling
from wuerstchen_core.sampling import NoiseSource, generators_for_seeds

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(width=256, height=256, prior_steps=2, decoder_steps=2, prior_cfg=4.0, decoder_cfg=2.0)


def tame_(prior, decoder):
    """Shrink the output heads of random tiny models: with random heads the prior's (x − a)/|1 − b| reaches
    1e5 and amplifies float rounding into different images, which real weights do not do."""
    with torch.no_grad():
        for head in (prior.out[1], decoder.clf[1]):
            head.weight.mul_(0.02)
            head.bias.mul_(0.02)
    return prior, decoder


@pytest.fixture(scope="module")
def models():
    return (*tame_(tiny_prior(c_in=8, seed=1), tiny_decoder(seed=2)), tiny_vqgan(seed=3),
            tiny_text_encoder(0, hidden_size=48), tiny_text_encoder(1, hidden_size=48))


@pytest.fixture(scope="module")
def singles(models):
    return [pipeline.generate(*models, "a cat", "blurry", seed=20 + i, decoder_seed=40 + i, **SETTINGS) for i in range(4)]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


def test_same_seed_same_tensors_other_seed_other_image(models, singles):
    again = pipeline.generate(*models, "a cat", "blurry", seed=20, decoder_seed=40, **SETTINGS)
    assert torch.equal(again, singles[0])
    assert (singles[1] - singles[0]).abs().max() > 0.05


def test_batch_of_4_equals_four_single_runs_with_per_image_seeds(models, singles):
    """Equal noise per image; the outputs agree up to the rounding of batched vs single matmuls."""
    batch = pipeline.generate(*models, "a cat", "blurry", batch=4, seed=20, decoder_seed=40, **SETTINGS)
    for i in range(4):
        torch.testing.assert_close(batch[i:i + 1], singles[i], rtol=0, atol=1e-4)
    assert min((batch[i] - batch[j]).abs().max() for i in range(4) for j in range(i)) > 0.05


def test_batch_index_picks_the_same_noise_as_the_matching_single_run(models):
    prior, _, _, text, _ = models
    cond = text.encode(["a cat"])
    two = pipeline.sample_stage_c(prior, cond, height=256, width=256, seeds=100, batch_index=[3, 7], steps=2, cfg=1)
    for row, index in enumerate((3, 7)):
        one = pipeline.sample_stage_c(prior, cond, height=256, width=256, seeds=[100 + index], steps=2, cfg=1)
        torch.testing.assert_close(two[row:row + 1], one, rtol=0, atol=1e-4)


def test_noise_drawn_by_the_background_workers_gives_the_same_image(models, singles, monkeypatch):
    """What a GPU run does (the draws on worker threads, ahead of the sampler), forced on the CPU with three
    workers: the same generators yield the same noise in the same order, so the image is the same."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    sampling._noise_workers.cache_clear()
    monkeypatch.setattr(pipeline, "NoiseSource", lambda *a, **k: NoiseSource(*a, **k, background=True))
    try:
        batch = pipeline.generate(*models, "a cat", "blurry", batch=4, seed=20, decoder_seed=40, **SETTINGS)
        assert len(sampling._noise_workers()) == 3
    finally:
        sampling._noise_workers.cache_clear()
    plain = pipeline.generate(*models, "a cat", "blurry", batch=4, seed=20, decoder_seed=40, **SETTINGS)
    assert torch.equal(batch, plain)
    torch.testing.assert_close(batch[:1], singles[0], rtol=0, atol=1e-4)


def test_noise_is_drawn_on_the_cpu_then_moved(models, monkeypatch):
    draws = []
    randn = torch.randn

    def recording_randn(*args, **kwargs):
        draws.append((kwargs.get("generator"), kwargs.get("device")))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", recording_randn)
    prior, decoder, _, text_c, text_b = models
    c = pipeline.sample_stage_c(prior, text_c.encode(["x"]), height=256, width=256, seeds=[1, 2], steps=2, cfg=1)
    pipeline.sample_stage_b(decoder, c, text_b.encode(["x"]), seeds=[1, 2], steps=2)
    assert len(draws) == 2 * (1 + 2) * 2  # two stages × (initial + one per ddpm step) × two images
    assert all(g is not None and g.device.type == "cpu" and d is None for g, d in draws)

    # a draw for another device consumes the CPU generators exactly like a CPU draw
    on_meta, on_cpu = generators_for_seeds([5, 6]), generators_for_seeds([5, 6])
    moved = NoiseSource(on_meta, "meta")((2, 4, 3, 3))
    NoiseSource(on_cpu, "cpu")((2, 4, 3, 3))
    assert moved.device.type == "meta"
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(on_meta, on_cpu))


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _generate_argv(models_dir: Path, output: str) -> list[str]:
    w = models_dir / "wuerstchen"
    return ["generate", "--prior", str(w / FILES["prior"]), "--decoder", str(w / FILES["decoder"]),
            "--vqgan", str(w / FILES["vqgan"]), "--prior-text-encoder", str(w / FILES["bigG"]),
            "--decoder-text-encoder", str(w / FILES["H"]), "--prompt", "a cat", "--negative-prompt", "blurry",
            "--width", "256", "--height", "256", "--batch", "2", "--seed", "11", "--prior-steps", "2",
            "--decoder-steps", "2", "--decoder-cfg", "2", "--device", "cpu", "--output", output]


def test_two_processes_write_identical_images_and_nothing_else(models_dir, tmp_path):
    """Two CLI processes (run side by side) in fresh working folders with their own HOME and TMPDIR:
    byte-identical PNGs, equal to this process's tensors, and the only new files are the outputs."""
    before = _tree(models_dir)
    runs = []
    for name in ("a", "b"):
        cwd, home, tmp = (tmp_path / name / d for d in ("cwd", "home", "tmp"))
        for d in (cwd, home, tmp):
            d.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME", "TORCH_HOME")}
        env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "wuerstchen_core", *_generate_argv(models_dir, "out/img.png")],
                                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((proc, cwd, home, tmp))
    pngs = []
    for proc, cwd, home, tmp in runs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert out.split() == ["out/img_00.png", "out/img_01.png"] and "Traceback" not in err
        assert set(_tree(cwd)) == {"out", "out/img_00.png", "out/img_01.png"}
        assert _tree(home) == {} and _tree(tmp) == {}
        pngs.append([(cwd / "out" / f"img_0{i}.png").read_bytes() for i in range(2)])
    assert pngs[0] == pngs[1]
    assert _tree(models_dir) == before

    # the same settings in this process give the same pixels
    w = models_dir / "wuerstchen"
    parts = (loading.load_prior(w / FILES["prior"]), loading.load_decoder(w / FILES["decoder"]),
             loading.load_vqgan(w / FILES["vqgan"]), loading.load_text_encoder(w / FILES["bigG"], "bigG"),
             loading.load_text_encoder(w / FILES["H"], "H"))
    images = pipeline.generate(*parts, "a cat", "blurry", width=256, height=256, batch=2, seed=11, decoder_seed=11,
                               prior_steps=2, decoder_steps=2, decoder_cfg=2.0)
    for i, image in enumerate(images):
        ours = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        theirs = np.asarray(Image.open((tmp_path / "a" / "cwd" / "out" / f"img_0{i}.png")))
        assert np.array_equal(ours, theirs)
        settings = json.loads(Image.open(tmp_path / "a" / "cwd" / "out" / f"img_0{i}.png").text["wuerstchen"])
        assert settings["seed"] == 11 + i and settings["decoder_seed"] == 11 + i


def test_no_network_access_while_loading_generating_and_running_the_cli(models_dir, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during a test of issue 4")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)

    w = models_dir / "wuerstchen"
    assert cli.main(_generate_argv(models_dir, str(tmp_path / "gen" / "img.png"))) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["img_00.png", "img_01.png"]
    assert cli.main(["convert", str(w / FILES["vqgan"]), str(tmp_path / "conv"), "--dtype", "fp32"]) == 0
    assert loading.load_vqgan(tmp_path / "conv" / "wuerstchen_v2_vqgan_fp32.safetensors").cfg == \
        loading.load_vqgan(w / FILES["vqgan"]).cfg
    (tmp_path / "wf.json").write_text(json.dumps(tiny_workflow()))
    assert cli.main(["run", str(tmp_path / "wf.json"), "--models-dir", str(models_dir), "--output-dir",
                     str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["t_00001_.png"]
    assert attempts == []


def test_sampling_module_draws_through_generators_only():
    """No sampler falls back to the global RNG: the same generators give the same draws whatever the
    global seed is."""
    x = torch.zeros(2, 4, 6, 6)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        noise = NoiseSource(generators_for_seeds([3, 4]))
        runs.append(sampling.sample(lambda x, r: x * 0.1, noise(x.shape), torch.linspace(1, 0, 4), "ddpm", noise=noise))
    assert torch.equal(*runs)
