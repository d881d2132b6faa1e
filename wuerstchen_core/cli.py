"""Command line: `python -m wuerstchen_core generate | convert | run`.

User errors (WuerstchenError, unreadable paths) print one `error: ...` line and exit 2, without a
traceback. Progress goes to stderr when it is a terminal; written file names go to stdout.
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import secrets
import sys
import tempfile
import warnings
from pathlib import Path

from .errors import WuerstchenError
from .sizes import snap_size

NO_WEIGHTS = """error: no weights given; --prior and --decoder are required.
Download the two diffusers repos from the Hugging Face Hub (about 12 GB; the .bin files duplicate the .safetensors):
  huggingface-cli download warp-ai/wuerstchen-prior --exclude "*.bin" --local-dir models/wuerstchen-prior
  huggingface-cli download warp-ai/wuerstchen --exclude "*.bin" --local-dir models/wuerstchen
warp-ai/wuerstchen-prior holds the Stage C prior (prior/), its CLIP bigG text encoder (text_encoder/) and tokenizer/;
warp-ai/wuerstchen holds the Stage B decoder (decoder/), the Stage A VQGAN (vqgan/), its CLIP H text encoder and tokenizer/.
Then run:
  python -m wuerstchen_core generate --prior models/wuerstchen-prior --decoder models/wuerstchen --prompt "..." --output out.png
Single component files (e.g. from `python -m wuerstchen_core convert`) also work: pass --vqgan,
--prior-text-encoder and --decoder-text-encoder for the parts a file does not hold."""


class UsageError(WuerstchenError):
    """A command line that cannot run (missing option, bad value)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wuerstchen_core", description="Würstchen v2 text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> PNG through Stage C, Stage B and Stage A")
    g.add_argument("--prior", help="warp-ai/wuerstchen-prior folder, or a Stage C prior file/folder")
    g.add_argument("--decoder", help="warp-ai/wuerstchen folder, or a Stage B decoder file/folder")
    g.add_argument("--vqgan", help="Stage A VQGAN (default: vqgan/ of --decoder)")
    g.add_argument("--prior-text-encoder", help="CLIP bigG text encoder (default: text_encoder/ of --prior)")
    g.add_argument("--decoder-text-encoder", help="CLIP H text encoder (default: text_encoder/ of --decoder)")
    g.add_argument("--effnet", help="EfficientNet encoder, for --image (dome272/wuerstchen model_v2_stage_b.pt)")
    g.add_argument("--image", help="start Stage C from this image (img2img; needs --effnet)")
    g.add_argument("--denoise", type=float, default=0.7, help="img2img strength in [0, 1] (default 0.7)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=1024, help="multiple of 128 px (default 1024)")
    g.add_argument("--height", type=int, default=1024, help="multiple of 128 px (default 1024)")
    g.add_argument("--batch", type=_positive, default=1)
    g.add_argument("--seed", type=int, help="seed of image 0; image i uses seed + i (default: random)")
    g.add_argument("--decoder-seed", type=int, help="Stage B seed (default: --seed)")
    g.add_argument("--prior-steps", type=_positive, help="linear Stage C steps (default: the 29-step Würstchen preset)")
    g.add_argument("--prior-cfg", type=float, default=4.0)
    g.add_argument("--decoder-steps", type=_positive, default=12)
    g.add_argument("--decoder-cfg", type=float, default=0.0)
    g.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"), default="ddpm")
    g.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: bf16 (fp16 without bf16 support) on CUDA, fp32 on CPU")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--tile", type=_positive, help="decode Stage A in latent tiles of this size (e.g. 128 above 2048 px)")
    speed = g.add_mutually_exclusive_group()
    speed.add_argument("--fast", action="store_true",
                       help="compile the networks' repeated blocks (torch.compile; CUDA graphs on a GPU): the first "
                            "run compiles, again for each new size or batch (the networks compiled whole took 90–120 s "
                            "on an H200; by block they compile 3–4× faster on a CPU)")
    speed.add_argument("--cuda-graphs", action="store_true",
                       help="replay Stage B and C's eager steps from CUDA graphs (CUDA only): most of --fast's gain "
                            "at small batches, captured with three eager steps per size and batch instead of compiled")
    g.add_argument("--low-vram", action="store_true",
                   help="keep every model on the CPU and move each stage to the device only while it runs (what "
                        "runs once per image, the text encoders and the Stage B/C text mappers, one layer at a time)")
    g.add_argument("--fp8", action="store_true",
                   help="store the Stage B/C Linear weights in float8 (about half the memory of fp16); "
                        "they compute in --dtype")
    g.add_argument("--fp8-fast", action="store_true",
                   help="as --fp8, and multiply them in float8 too (inputs scaled per row; lossy): fp8 tensor "
                        "cores, Hopper GPUs or the CPU")
    g.add_argument("--output", default="wuerstchen.png", help="PNG file; batches write FILE_00.png, FILE_01.png, ...")

    c = sub.add_parser("convert", help="any supported checkpoint -> compact .safetensors per component")
    c.add_argument("input", help="repo folder, component folder, .safetensors or original .pt")
    c.add_argument("output", help="output folder, or a .safetensors file for a single component")
    c.add_argument("--kinds", nargs="+", choices=("prior", "decoder", "vqgan", "effnet", "text"))
    c.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    c.add_argument("--overwrite", action="store_true")

    r = sub.add_parser("run", help="run a ComfyUI workflow JSON (API or UI format) without ComfyUI")
    r.add_argument("workflow")
    r.add_argument("--models-dir", default="models", help="ComfyUI-style models folder (default: ./models)")
    r.add_argument("--output-dir", default="output")
    r.add_argument("--input-dir", help="images the workflow loads (default: the workflow's folder)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


# ---------------------------------------------------------------------------------------------
# generate


def _device_and_dtype(args):
    import torch

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given, but PyTorch sees no CUDA GPU; expected --device cpu or auto.")
    if args.dtype != "auto":
        return device, args.dtype
    if device == "cuda":
        return device, "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return device, "fp32"


def _part(path: str | None, default: str, option: str, what: str) -> str:
    """A component's path: its own option, else the repo folder it ships in."""
    if path is not None:
        return path
    if not Path(default).is_dir():
        raise UsageError(f"{Path(default).name} is a single file, so {what} must be given with {option}.")
    return default


class _Progress:
    """One carriage-return progress line per stage on a terminal; silent otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty = stream, stream.isatty()

    def __call__(self, stage: str, step: int, total: int):
        if self.tty:
            self.stream.write(f"\r{stage}: {step}/{total}" + ("\n" if step == total else ""))
            self.stream.flush()

    def note(self, text: str):
        if self.tty:
            print(text, file=self.stream, flush=True)


class _StderrHandler(logging.StreamHandler):
    """Writes each record to sys.stderr as it is then (it may have been replaced since)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _show_log():
    """Print the pack's INFO records (fast mode's compile notices) on stderr; set up once per process."""
    logger = logging.getLogger("wuerstchen_core")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _output_paths(output: str, batch: int) -> list[Path]:
    path = Path(output).expanduser()
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output {output}: expected a file name ending in .png.")
    if batch == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i:02d}{path.suffix}") for i in range(batch)]


def _save_png(image, path: Path, settings: dict) -> None:
    """image [3,H,W] float in 0..1 -> PNG with the settings as text, written atomically (temp + rename)."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    pixels = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("wuerstchen", json.dumps(settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(pixels).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def generate(args) -> int:
    if args.prior is None or args.decoder is None:
        print(NO_WEIGHTS, file=sys.stderr)
        return 2
    if args.image is not None and args.effnet is None:
        raise UsageError("--image needs --effnet: the EfficientNet encoder ships only in dome272/wuerstchen's "
                         "model_v2_stage_b.pt (convert it with `python -m wuerstchen_core convert`).")
    if args.width <= 0 or args.height <= 0:
        raise UsageError(f"Image size {args.width}×{args.height}: expected positive sides (multiples of 128 px).")
    snap_size(args.width, args.height)  # refuse bad sizes before loading gigabytes
    if min(args.seed or 0, args.decoder_seed or 0) < 0:
        raise UsageError("Seeds must be non-negative integers.")
    outputs = _output_paths(args.output, args.batch)
    for option, path in (("--prior", args.prior), ("--decoder", args.decoder), ("--effnet", args.effnet),
                         ("--image", args.image)):
        if path is not None and not Path(path).expanduser().exists():
            raise UsageError(f"{option} {path} does not exist; expected a file or folder.")

    from . import loading, performance

    device, dtype = _device_and_dtype(args)
    if args.cuda_graphs and device not in performance.GRAPH_DEVICES:
        raise UsageError(f"--cuda-graphs needs a CUDA device; the run would use {device}.")
    home = "cpu" if args.low_vram else device  # where the models wait between stages
    progress = _Progress()
    if progress.tty:
        _show_log()
    bigg_path = _part(args.prior_text_encoder, args.prior, "--prior-text-encoder", "the CLIP bigG text encoder")
    h_path = _part(args.decoder_text_encoder, args.decoder, "--decoder-text-encoder", "the CLIP H text encoder")
    vqgan_path = _part(args.vqgan, args.decoder, "--vqgan", "the Stage A VQGAN")
    for path, kind in ((args.prior, "prior"), (args.decoder, "decoder"), (vqgan_path, "vqgan")):
        loading.resolve_component(path, kind)  # a wrong folder or file type fails now, not after the text
    progress.note(f"encoding the prompt ({dtype} on {device})")
    embeddings = _encode_prompts(args, bigg_path, h_path, dtype, home, device)
    progress.note(f"loading models ({dtype} on {device}{', offloaded to the CPU' if args.low_vram else ''})")
    prior = loading.load_prior(args.prior, dtype, home)
    decoder = loading.load_decoder(args.decoder, dtype, home)
    vqgan = loading.load_vqgan(vqgan_path, dtype, home)
    if args.fp8 or args.fp8_fast:
        prior, decoder = (performance.store_linear_weights_in_fp8(m, matmul=args.fp8_fast) for m in (prior, decoder))
    if args.fast:  # CUDA graphs keep weight addresses: not with --low-vram, which re-uploads every image
        graphs = device == "cuda" and not args.low_vram
        prior, decoder, vqgan = (performance.compile_model(m, cuda_graphs=graphs) for m in (prior, decoder, vqgan))
    if args.cuda_graphs:  # with --low-vram each image re-uploads the weights and so captures anew
        prior, decoder = performance.GraphedNetwork(prior), performance.GraphedNetwork(decoder)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    decoder_seed = seed if args.decoder_seed is None else args.decoder_seed
    settings = {k: getattr(args, k) for k in ("prompt", "negative_prompt", "width", "height", "prior_steps",
                                              "prior_cfg", "decoder_steps", "decoder_cfg", "sampler", "denoise",
                                              "fp8", "fp8_fast")}
    settings |= {"dtype": dtype, "seed": seed, "decoder_seed": decoder_seed,
                 "models": {"prior": args.prior, "decoder": args.decoder}}
    if args.image is None:
        settings.pop("denoise")
    else:
        settings["image"] = args.image
    with performance.compile_errors("--fast", enabled=args.fast):
        images = _sample(args, prior, decoder, vqgan, embeddings, seed, decoder_seed, device, progress)
    for i, (image, path) in enumerate(zip(images, outputs)):
        _save_png(image, path, settings | {"seed": seed + i, "decoder_seed": decoder_seed + i})
        print(path)
    return 0


def _stage(args, device, model, stream=()):
    """With --low-vram: `model` on the device only inside the block, `stream` parts one at a time."""
    from .performance import on_device

    return on_device(model, device, stream) if args.low_vram else contextlib.nullcontext(model)


def _encode_prompts(args, bigg_path, h_path, dtype, home, device):
    """((cond, uncond) for Stage C, (cond, uncond) for Stage B). Each text encoder is loaded, runs once
    and is freed before the next model loads, so the sampling stages never share the device with
    them (with --low-vram they also stream through it layer by layer)."""
    import torch

    from . import loading, pipeline

    embeddings = []
    for path, tower, guided in ((bigg_path, "bigG", args.prior_cfg > 1), (h_path, "H", args.decoder_cfg > 1)):
        text = loading.load_text_encoder(path, tower, dtype, home)
        with _stage(args, device, text.model, text.layers):
            embeddings.append(pipeline.encode_prompt(text, args.prompt, args.negative_prompt, guided))
        del text
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # hand the text encoders' memory back, not just to our allocator
    return embeddings


def _sample(args, prior, decoder, vqgan, embeddings, seed, decoder_seed, device, progress):
    """Stage C (from noise, or from --image encoded by the EfficientNet), then Stage B and Stage A.
    With --low-vram each model visits the device only for its own stage."""
    from . import pipeline

    stage = functools.partial(_stage, args, device)
    (c_cond, c_uncond), (b_cond, b_uncond) = embeddings
    report = {s: (lambda i, n, x, x0, s=s: progress(s, i + 1, n)) for s in ("Stage C", "Stage B")}
    latent = None if args.image is None else _encode_image(args, device, stage)
    with stage(prior, prior.conditioning_layers):  # the text mappers run once per run: streamed
        c = pipeline.sample_stage_c(
            prior, c_cond, c_uncond, latent=latent, height=args.height, width=args.width,
            seeds=pipeline.image_seeds(seed, args.batch), steps=args.prior_steps, cfg=args.prior_cfg,
            sampler=args.sampler, denoise=1.0 if latent is None else args.denoise, callback=report["Stage C"])
    with stage(decoder, decoder.conditioning_layers):
        b = pipeline.sample_stage_b(
            decoder, c, b_cond, b_uncond, seeds=pipeline.image_seeds(decoder_seed, args.batch),
            steps=args.decoder_steps, cfg=args.decoder_cfg, sampler=args.sampler, callback=report["Stage B"])
    with stage(vqgan):
        images = pipeline.decode_stage_a(vqgan, b, tile=args.tile)
    progress("Stage A", 1, 1)
    return images


def _encode_image(args, device, stage):
    """--image -> Stage C latent through the EfficientNet encoder (img2img)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from . import loading, pipeline

    try:
        pixels = np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"--image {args.image} cannot be read as an image ({e}).") from None
    width, height, note = snap_size(args.width, args.height)
    if note:
        warnings.warn(note)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].expand(args.batch, -1, -1, -1)
    effnet = loading.load_effnet(args.effnet, "fp32", "cpu" if args.low_vram else device)
    with stage(effnet):
        return pipeline.encode_stage_c(effnet, image, width, height)


# ---------------------------------------------------------------------------------------------
# convert, run


def convert(args) -> int:
    from .convert import convert as run_convert

    for path in run_convert(args.input, args.output, kinds=args.kinds, dtype=args.dtype, overwrite=args.overwrite):
        print(path)
    return 0


def run(args) -> int:
    if not Path(args.workflow).is_file():
        raise UsageError(f"Workflow {args.workflow} does not exist; expected an API- or UI-format .json file.")
    repo_root = str(Path(__file__).resolve().parent.parent)
    if repo_root not in sys.path:
        sys.path.append(repo_root)
    try:
        from nodes.runner import run_workflow_file
    except ImportError as e:
        raise UsageError(f"The workflow runner (nodes/runner.py next to wuerstchen_core/) cannot be imported ({e}); "
                         "expected the full node pack checkout.") from None
    import torch

    _show_log()  # next to the workflow runner's progress lines, which go to stderr too
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    result = run_workflow_file(args.workflow, args.models_dir, args.output_dir, device=device, input_dir=args.input_dir)
    for node_ui in result.get("ui", {}).values():
        for image in node_ui.get("images", []):
            if image.get("type") == "output":
                print(os.path.join(args.output_dir, image.get("subfolder", ""), image["filename"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        return {"generate": generate, "convert": convert, "run": run}[args.command](args)
    except WuerstchenError as e:
        print(f"error: {e}", file=sys.stderr)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 2
