"""`python -m wuerstchen_core generate` end to end on tiny models saved in the diffusers repo-folder
layout, and the one-line errors (exit code 2, no traceback) for bad input."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.helpers.tiny_models import tiny_decoder, tiny_prior, tiny_vqgan
from tests.helpers.tiny_text import tiny_text_model
from wuerstchen_core import cli, performance

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT_WIDTH = 128  # tiny CLIP towers


def _save_component(folder: Path, model, class_name: str) -> None:
    folder.mkdir(parents=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.cfg).items()}
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """warp-ai/wuerstchen-prior and warp-ai/wuerstchen look-alikes (no tokenizer/: the shipped BPE is used)."""
    root = tmp_path_factory.mktemp("repos")
    prior_repo, decoder_repo = root / "wuerstchen-prior", root / "wuerstchen"
    prior = tiny_prior(c_cond=TEXT_WIDTH)
    with torch.no_grad():  # small output head: keeps the random prior's latents O(1)
        prior.out[1].weight.mul_(0.1)
    _save_component(prior_repo / "prior", prior, "WuerstchenPrior")
    tiny_text_model(1).save_pretrained(prior_repo / "text_encoder")
    _save_component(decoder_repo / "decoder", tiny_decoder(clip_embd=TEXT_WIDTH, effnet_embd=prior.cfg.c_in,
                                                           blocks=(1, 1, 1, 1)), "WuerstchenDiffNeXt")
    _save_component(decoder_repo / "vqgan", tiny_vqgan(), "PaellaVQModel")
    tiny_text_model(2).save_pretrained(decoder_repo / "text_encoder")
    for repo, cls in ((prior_repo, "WuerstchenPriorPipeline"), (decoder_repo, "WuerstchenDecoderPipeline")):
        (repo / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    return prior_repo, decoder_repo


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "wuerstchen_core", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=300)


def _main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_batch_writes_numbered_pngs(repos, tmp_path):
    prior_repo, decoder_repo = repos
    out = tmp_path / "out" / "cat.png"
    run = _cli("generate", "--prior", str(prior_repo), "--decoder", str(decoder_repo), "--prompt", "a cat",
               "--width", "384", "--height", "256", "--batch", "2", "--seed", "3", "--prior-steps", "2",
               "--prior-cfg", "2.0", "--decoder-steps", "1", "--device", "cpu", "--output", str(out))
    assert run.returncode == 0, run.stderr
    paths = [out.with_name("cat_00.png"), out.with_name("cat_01.png")]
    assert run.stdout.split() == [str(p) for p in paths]
    assert sorted(os.listdir(out.parent)) == ["cat_00.png", "cat_01.png"]  # no temp files left behind
    images = [Image.open(p) for p in paths]
    assert all(im.size == (384, 256) and im.mode == "RGB" for im in images)
    meta = [json.loads(im.text["wuerstchen"]) for im in images]
    assert [m["seed"] for m in meta] == [3, 4] and [m["decoder_seed"] for m in meta] == [3, 4]
    assert meta[0]["prompt"] == "a cat" and meta[0]["prior_cfg"] == 2.0 and meta[0]["dtype"] == "fp32"
    assert images[0].tobytes() != images[1].tobytes()


def test_no_weights_explains_what_to_download(capsys):
    code, out, err = _main(capsys, "generate", "--prompt", "a cat")
    assert code == 2 and out == ""
    assert err.startswith("error: no weights given")
    for needed in ("huggingface-cli download warp-ai/wuerstchen-prior", "huggingface-cli download warp-ai/wuerstchen ",
                   "--prior", "--decoder", "prior/", "vqgan/", "text_encoder/"):
        assert needed in err


def _one_line_error(code, err):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_path(capsys, repos, tmp_path):
    code, _, err = _main(capsys, "generate", "--prior", str(tmp_path / "nope"), "--decoder", str(repos[1]),
                         "--prompt", "x")
    _one_line_error(code, err)
    assert "--prior" in err and "does not exist" in err


@pytest.mark.parametrize("wrong", ["decoder_repo", "vqgan_file", "text_file"])
def test_wrong_file_for_prior(capsys, repos, tmp_path, wrong):
    prior_repo, decoder_repo = repos
    path = {"decoder_repo": decoder_repo,
            "vqgan_file": decoder_repo / "vqgan" / "diffusion_pytorch_model.safetensors",
            "text_file": tmp_path / "notes.txt"}[wrong]
    if wrong == "text_file":
        path.write_text("hello")
    code, _, err = _main(capsys, "generate", "--prior", str(path), "--decoder", str(decoder_repo), "--prompt", "x",
                         "--prior-text-encoder", str(prior_repo), "--device", "cpu")
    _one_line_error(code, err)
    expected = {"decoder_repo": "no prior/", "vqgan_file": "VQGAN", "text_file": "not a weights file"}[wrong]
    assert expected in err


def test_a_wrong_folder_fails_before_the_text_encoders_load(capsys, repos, monkeypatch):
    from wuerstchen_core import loading

    def no_text(*a, **k):
        raise AssertionError("a text encoder was loaded before the prior's path was checked")

    monkeypatch.setattr(loading, "load_text_encoder", no_text)
    prior_repo, decoder_repo = repos
    code, _, err = _main(capsys, "generate", "--prior", str(decoder_repo), "--decoder", str(decoder_repo),
                         "--prompt", "x", "--prior-text-encoder", str(prior_repo), "--device", "cpu")
    _one_line_error(code, err)
    assert "no prior/" in err


def test_component_file_needs_its_companions(capsys, repos):
    prior_repo, decoder_repo = repos
    code, _, err = _main(capsys, "generate", "--prior", str(prior_repo / "prior" / "diffusion_pytorch_model.safetensors"),
                         "--decoder", str(decoder_repo), "--prompt", "x", "--device", "cpu")
    _one_line_error(code, err)
    assert "--prior-text-encoder" in err


@pytest.mark.parametrize("size, message", [(("5000", "1024"), "at most 4096"), (("0", "512"), "positive")])
def test_bad_size(capsys, repos, size, message):
    code, _, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]), "--prompt", "x",
                         "--width", size[0], "--height", size[1])
    _one_line_error(code, err)
    assert message in err


def test_errors_in_a_real_process(tmp_path):
    run = _cli("generate", "--prior", str(tmp_path), "--decoder", str(tmp_path), "--prompt", "x", "--width", "9999")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    run = _cli("generate", "--prompt", "x")
    assert run.returncode == 2 and "warp-ai/wuerstchen-prior" in run.stderr and "Traceback" not in run.stderr


def test_output_must_be_png_and_run_needs_a_workflow(capsys, repos, tmp_path):
    code, _, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]), "--prompt", "x",
                         "--output", str(tmp_path / "a.jpg"))
    _one_line_error(code, err)
    assert ".png" in err
    code, _, err = _main(capsys, "run", str(tmp_path / "missing.json"))
    _one_line_error(code, err)
    assert "missing.json" in err


def test_convert_subcommand(capsys, repos, tmp_path):
    code, out, err = _main(capsys, "convert", str(repos[0]), str(tmp_path / "converted"), "--dtype", "fp32")
    assert code == 0, err
    written = [Path(p) for p in out.split()]
    assert {p.name for p in written} == {"wuerstchen_v2_prior_fp32.safetensors",
                                         "wuerstchen_v2_text_custom_fp32.safetensors"}
    assert all(p.is_file() for p in written)
    code, _, err = _main(capsys, "convert", str(repos[0]), str(tmp_path / "converted"), "--dtype", "fp32")
    _one_line_error(code, err)  # existing outputs are kept without --overwrite
    assert "--overwrite" in err


@pytest.mark.parametrize("flag", ["--low-vram", "--fp8", "--fp8-fast"])
def test_low_vram_and_fp8_write_a_valid_png(capsys, repos, tmp_path, flag):
    out = tmp_path / f"{flag[2:]}.png"
    code, stdout, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]),
                              "--prompt", "a cat", "--width", "256", "--height", "384", "--seed", "1",
                              "--prior-steps", "2", "--decoder-steps", "1", "--device", "cpu", "--output", str(out),
                              flag)
    assert code == 0, err
    assert stdout.split() == [str(out)]
    image = Image.open(out)
    assert image.size == (256, 384) and image.mode == "RGB"
    settings = json.loads(image.text["wuerstchen"])
    assert (settings["fp8"], settings["fp8_fast"]) == (flag == "--fp8", flag == "--fp8-fast")
    assert len(set(image.getdata())) > 1  # a picture, not one flat colour from NaNs


def test_fast_without_a_working_compiler_is_one_error_line(capsys, repos, tmp_path, monkeypatch):
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(performance, "compile_model",
                        lambda model, cuda_graphs: torch.compile(model, backend=no_compiler))
    code, _, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]), "--prompt", "a cat",
                         "--width", "256", "--height", "256", "--prior-steps", "1", "--decoder-steps", "1",
                         "--device", "cpu", "--output", str(tmp_path / "fast.png"), "--fast")
    _one_line_error(code, err)
    assert err.startswith("error: --fast: fast mode could not compile the network") and "C++ compiler found" in err
    assert not (tmp_path / "fast.png").exists()


def test_speed_flags_parse_and_fast_is_documented(capsys):
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--fast", "--low-vram", "--fp8"])
    assert args.fast and args.low_vram and args.fp8 and not args.cuda_graphs
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    assert not (args.fast or args.low_vram or args.fp8 or args.cuda_graphs)
    generate = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "90–120 s on an H200" in " ".join(generate.format_help().split())
    with pytest.raises(SystemExit):  # two ways of removing launch overhead: one at a time
        cli.build_parser().parse_args(["generate", "--prompt", "x", "--fast", "--cuda-graphs"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_packs_notices_reach_the_current_stderr_once(capsys):
    """generate on a terminal and run show the pack's INFO records (fast mode's compile notices): one
    handler however often it is set up, writing to sys.stderr as it is when a record comes."""
    logger = logging.getLogger("wuerstchen_core")
    handlers, level = list(logger.handlers), logger.level
    try:
        cli._show_log()
        cli._show_log()
        logging.getLogger("wuerstchen_core.performance").info("Würstchen fast mode: a notice")
        assert capsys.readouterr().err == "Würstchen fast mode: a notice\n"
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def test_cuda_graphs_on_the_cpu_is_one_error_line(capsys, repos, tmp_path):
    code, _, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]), "--prompt", "a cat",
                         "--device", "cpu", "--output", str(tmp_path / "g.png"), "--cuda-graphs")
    _one_line_error(code, err)
    assert "--cuda-graphs needs a CUDA device; the run would use cpu" in err


def test_cuda_graphs_gives_the_eager_image(capsys, repos, tmp_path, fake_cuda_graphs):
    """--cuda-graphs wraps Stage B and C (a stand-in for the CUDA graph on the CPU): the same PNG pixels
    as the eager run, one capture per stage."""
    def run(*flags):
        out = tmp_path / f"graphs{len(flags)}.png"
        code, _, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]),
                             "--prompt", "a cat", "--width", "256", "--height", "256", "--seed", "4",
                             "--prior-steps", "3", "--decoder-steps", "2", "--device", "cpu", "--output", str(out),
                             *flags)
        assert code == 0, err
        return list(Image.open(out).getdata())

    assert run("--cuda-graphs") == run()
    assert len(fake_cuda_graphs) == 2


def test_text_encoders_are_freed_before_the_sampling_models_load(capsys, repos, tmp_path, monkeypatch):
    """They run once, at the start: the default (all on the device) run never holds them together with
    Stage B/C, so its peak is the sampling models alone."""
    import gc
    import weakref

    from wuerstchen_core import loading

    towers, alive_at_prior_load = [], []
    load_text, load_prior = loading.load_text_encoder, loading.load_prior

    def recording_text(*a, **k):
        text = load_text(*a, **k)
        towers.append(weakref.ref(text.model))
        return text

    def checking_prior(*a, **k):
        gc.collect()
        alive_at_prior_load.extend(ref() is not None for ref in towers)
        return load_prior(*a, **k)

    monkeypatch.setattr(loading, "load_text_encoder", recording_text)
    monkeypatch.setattr(loading, "load_prior", checking_prior)
    code, _, err = _main(capsys, "generate", "--prior", str(repos[0]), "--decoder", str(repos[1]), "--prompt", "a cat",
                         "--width", "256", "--height", "256", "--prior-steps", "1", "--decoder-steps", "1",
                         "--device", "cpu", "--output", str(tmp_path / "freed.png"))
    assert code == 0, err
    assert alive_at_prior_load == [False, False]
