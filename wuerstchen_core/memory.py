"""GPU memory estimates per stage, a check that runs before a stage allocates, and the translation of
a real CUDA out-of-memory error into a clear one that leaves the process usable.

An estimate is the stage's weights that still have to move to the device plus its peak activations.
Activations scale with the images in flight (doubled by classifier-free guidance) times the widest
tensor of the network, the one at its finest grid:

  Stage C (prior)         c · hc · wc          at the Stage C grid (24×24 at 1024 px)
  Stage B (decoder)       c_hidden[0] · (hb/2) · (wb/2)   at the first U-Net level (128×128 at 1024 px)
  Stage A (VQGAN decode)  c_levels[0] · 2hb · 2wb         at the last up level (512×512 at 1024 px)

times a per-stage factor in elements (ACTIVATION_FACTOR), plus a fixed WORKSPACE. A ConvNeXt block holds
its input, the normalised copy and one 4×-wide channel-MLP tensor (GELU and GRN work in place), Stage B
also its U-Net skips and effnet maps; the Paella blocks of Stage A run their channel MLP over row bands,
so their peak is the input, the normalised and padded copies and the depthwise output. The Stage B/C
factors were measured on an H200 in bf16 (peak allocated minus weights, through the pipeline functions,
before GELU/GRN went in place, which only lowered the peaks); the Stage A factor comes from
`trace_activations`, which reproduced the H200's 4.13 GiB for the unbanded 2048 px decode. All are
rounded up, so the estimate errs on the safe side. Tiled Stage A decoding bounds the largest images.

On CPU devices nothing is checked: system RAM is not guessed at.

`trace_activations` predicts a forward's peak instead of estimating it: it runs the forward on the
meta device (no memory, no compute) and adds up the tensors alive after every operator. It does not
see kernel workspaces (cuBLAS, cuDNN); WORKSPACE stands for them.
"""

import contextlib
import dataclasses
import re
import traceback
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import WuerstchenError
from .sizes import stage_b_grid, stage_c_grid

STAGES = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)", "vqgan": "Stage A (VQGAN decode)"}
ACTIVATION_FACTOR = {"prior": 25, "decoder": 24, "vqgan": 6}  # elements per unit of the widest tensor
WORKSPACE = 64 * 2**20  # cuBLAS/cuDNN workspaces and the sampler's latents: ~50-60 MiB measured on an H200
TILES = (256, 128, 64, 32)  # Stage A tile sizes (latent px) offered when a whole decode does not fit
GiB = 2**30


class InsufficientMemoryError(WuerstchenError):
    """A stage needs (or needed) more GPU memory than the device has free."""


def tensor_slots(model: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """Every parameter and buffer slot of `model`: (its module's dict, name, the tensor there now).
    Module.to() either swaps a tensor's data in place (parameters between CPU and CUDA) or puts a new
    tensor in the slot (buffers, other devices); performance.restore_slots undoes both."""
    return [(table, name, t) for m in model.modules() for table in (m._parameters, m._buffers)
            for name, t in table.items() if t is not None]


def weight_bytes(module: nn.Module, device=None) -> int:
    """Bytes of `module`'s parameters and buffers; with `device`, only those not already on it. Read
    through the modules' slots (a shared tensor once): parameters() + buffers() name every tensor, which
    took 2.2 ms of a public Stage B's 3.0 ms estimate on this project's CPU, before each stage."""
    device = None if device is None else torch.device(device)
    tensors = {id(t): t for _, _, t in tensor_slots(module)}
    return sum(t.numel() * t.element_size() for t in tensors.values() if device is None or not is_on(t, device))


def is_on(t: torch.Tensor, device) -> bool:
    """Whether `t` is on `device`; a device without an index ("cuda") matches every index of its type."""
    device = device if isinstance(device, torch.device) else torch.device(device)  # called per tensor
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What a stage needs for `batch` images of height×width px (tile: Stage A latent tile size)."""

    stage: str  # a STAGES key
    cfg: object  # the model's config (PriorConfig, DecoderConfig, VQGANConfig)
    weights: int  # bytes still to be moved to the device
    batch: int
    height: int
    width: int
    element_size: int = 2  # bytes per activation element (the compute dtype)
    guided: bool = False  # classifier-free guidance: every forward sees 2 × batch
    tile: int | None = None

    @property
    def activations(self) -> int:
        return activation_bytes(self.stage, self.cfg, self.batch, self.height, self.width,
                                self.element_size, self.guided, self.tile)

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def replace(self, **changes) -> "MemoryEstimate":
        return dataclasses.replace(self, **changes)


def activation_bytes(stage: str, cfg, batch: int, height: int, width: int, element_size: int = 2,
                     guided: bool = False, tile: int | None = None) -> int:
    """Peak activation bytes of one stage for `batch` images of height×width px (see the module doc)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
    images = batch * (2 if guided and stage != "vqgan" else 1)
    hc, wc = stage_c_grid(height, width)
    hb, wb = stage_b_grid(hc, wc)
    if stage == "prior":
        widest = cfg.c * hc * wc
    elif stage == "decoder":
        widest = cfg.c_hidden[0] * (hb // cfg.patch_size) * (wb // cfg.patch_size)
    else:
        th, tw = (hb, wb) if tile is None else (min(tile, hb), min(tile, wb))
        up = cfg.up_down_scale_factor ** (cfg.levels - 1)
        widest = cfg.embed_dim // up * (th * up) * (tw * up)
    need = WORKSPACE + ACTIVATION_FACTOR[stage] * images * widest * element_size
    if stage == "vqgan":  # the float32 image, its clamped copy and, when tiled, the blend weights
        need += (2 * images * 3 + (tile is not None)) * (4 * hb) * (4 * wb) * 4
    return need


def estimate(stage: str, model: nn.Module, *, batch: int, height: int, width: int, guided: bool = False,
             tile: int | None = None, device=None, dtype: torch.dtype | None = None) -> MemoryEstimate:
    """The memory `model` needs on `device` for one stage: its weights not yet there + activations
    in `dtype` (default: the model's) for `batch` images of height×width px."""
    dtype = dtype or next(model.parameters()).dtype
    return MemoryEstimate(stage, model.cfg, weight_bytes(model, device), batch, height, width,
                          dtype.itemsize, guided, tile)


def free_bytes(device) -> int | None:
    """Bytes a new allocation can use on a CUDA device: free in the driver plus what PyTorch's caching
    allocator holds unused. None for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def _options(need: MemoryEstimate, free: int, offloadable: int) -> list[str]:
    """The changes, alone (or else combined), that make `need` fit into `free` bytes."""
    def fits(e, extra=0):
        return e.total <= free + extra

    single = []
    if offloadable and fits(need, offloadable):
        single.append(f"low-VRAM mode (offloading the other stages' {_gib(offloadable)} of weights)")
    if need.batch > 1:
        n = next((b for b in range(need.batch - 1, 0, -1) if fits(need.replace(batch=b))), None)
        if n:
            single.append(f"a batch of at most {n}")
    side = max(stage_b_grid(*stage_c_grid(need.height, need.width)))  # latent px; a tile this big is no tile
    tiles = [t for t in TILES if need.stage == "vqgan" and t < min(side, need.tile or side)]
    tile = next((t for t in tiles if fits(need.replace(tile=t))), None)
    if tile:
        single.append(f"tiled Stage A decode with {tile}-latent-px tiles ({4 * tile} px)")
    if single:
        return single
    # nothing alone is enough: one image at a time, with the largest tile and offloading if needed
    for combo in [need.replace(batch=1)] * (need.batch > 1) + [need.replace(batch=1, tile=t) for t in tiles]:
        if fits(combo, offloadable):
            return [", ".join(filter(None, (
                "low-VRAM mode" if not fits(combo) else "",
                "one image at a time" if need.batch > 1 else "",
                f"tiled Stage A decode with {combo.tile}-latent-px tiles" if combo.tile != need.tile else "")))]
    return []


def _explain(need, free: int, device, offloadable: int, what: str) -> str:
    if isinstance(need, MemoryEstimate):
        name = STAGES[need.stage]
        detail = (f" ({_gib(need.weights)} weights + {_gib(need.activations)} activations for "
                  f"{need.batch} image{'s' * (need.batch > 1)} at {need.width}×{need.height})")
        options = _options(need, free, offloadable)
        total = need.total
    else:
        name, detail, options, total = STAGES.get(what, what), "", [], int(need)
    advice = (f"it fits with {' or with '.join(options)}" if options else
              "no batch, tile or offload setting fits this size on this device, so choose a smaller image "
              "or run on the CPU")
    return f"{name} needs about {_gib(total)} on {device}{detail} but only {_gib(free)} is free; {advice}."


def check_fits(stage: str, need: "MemoryEstimate | int", device, *, free: int | None = None,
               offloadable: int = 0) -> None:
    """Raise InsufficientMemoryError when `need` (an estimate, or bytes) exceeds the free memory of a
    CUDA `device` (`free` overrides the measurement, e.g. in tests). No-op on CPU and other devices.

    offloadable: bytes held on the device by other models that low-VRAM mode would move off it.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    free = free_bytes(device) if free is None else free
    if free is None:
        return
    total = need.total if isinstance(need, MemoryEstimate) else int(need)
    if total > free:
        raise InsufficientMemoryError(_explain(need, free, device, offloadable, stage))


class translate_oom(contextlib.ContextDecorator):
    """Turn a CUDA out-of-memory error inside the block into InsufficientMemoryError, after releasing
    what the failed stage held (its frames are cleared, PyTorch's cache emptied), so the process
    can run the next request. `estimate` (optional) lets the message name the options that fit."""

    def __init__(self, stage: str, estimate: MemoryEstimate | None = None, device=None, offloadable: int = 0):
        self.stage, self.estimate, self.offloadable = stage, estimate, offloadable
        self.device = torch.device(device) if device is not None else None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, torch.OutOfMemoryError):
            return False
        asked = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
        traceback.clear_frames(tb)  # the frames of the failed stage still reference its tensors
        del exc, tb
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        free = free_bytes(self.device) if self.device is not None else None
        name = STAGES.get(self.stage, self.stage)
        where = f" on {self.device}" if self.device is not None else ""
        if self.estimate is not None and free is not None:
            options = _options(self.estimate, free, self.offloadable)
            hint = f"it fits with {' or with '.join(options)}" if options else "choose a smaller image or run on the CPU"
        else:
            hint = "try low-VRAM mode, tiled Stage A decode or a smaller batch"
        raise InsufficientMemoryError(
            f"{name} ran out of GPU memory{where} ({asked[0] if asked else 'out of memory'}"
            f"{f', {_gib(free)} free now' if free is not None else ''}); {hint}.") from None


# ---------------------------------------------------------------------------------------------
# peak activation memory of a forward, predicted on the meta device


class _FusedAttention(TorchFunctionMode):
    """Attention as the fused GPU kernels run it: only the output is allocated (the meta device
    would otherwise take the math path and materialise the [heads, N, M] score matrix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, _, v = args[:3]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **(kwargs or {}))


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the block that some tensor still references, after each
    operator; `peak` is the largest such sum. Storages of `keep` (weights, inputs) are not counted."""

    def __init__(self, keep):
        super().__init__()
        self.excluded = {t.untyped_storage()._cdata for t in keep}
        self.live: dict[int, tuple[int, list]] = {}  # storage id -> (bytes, weak refs to its tensors)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (_, refs) in self.live.items() if all(r() is None for r in refs)]:
            self.current -= self.live.pop(key)[0]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (key := t.untyped_storage()._cdata) not in self.excluded:
                if key not in self.live:
                    self.live[key] = (t.untyped_storage().nbytes(), [])
                    self.current += self.live[key][0]
                self.live[key][1].append(weakref.ref(t))
        self.peak = max(self.peak, self.current)
        return out


def trace_activations(fn, keep=()) -> int:
    """Peak bytes of the tensors `fn()` allocates, traced op by op. Run it on meta tensors and meta
    modules (public sizes cost nothing); pass the model's parameters and the inputs as `keep`."""
    with torch.no_grad(), _FusedAttention(), _LiveBytes(list(keep)) as live:
        fn()
    return live.peak


def trace_stage(net: nn.Module, stage: str, *, height: int, width: int, batch: int = 1, guided: bool = False,
                tile: int | None = None) -> int:
    """Traced peak activation bytes of one forward of a meta-device network for `batch` images of
    height×width px, called as the pipeline calls it: `stage` is a STAGES key (Stage C/B with guidance
    see 2·batch, Stage A returns the clamped float32 image, tiled when `tile` is given) or "text" (a
    CLIP text tower on 77 tokens)."""
    from .pipeline import _decode_tiled  # the pipeline imports this module

    dtype = next(p for p in net.parameters() if p.element_size() > 1).dtype
    hc, wc = stage_c_grid(height, width)
    hb, wb = stage_b_grid(hc, wc)
    n = batch * (2 if guided else 1)

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    if stage == "prior":
        args = (meta(n, net.cfg.c_in, hc, wc), meta(n), meta(n, 77, net.cfg.c_cond))
        fn = lambda: net(*args)  # noqa: E731
    elif stage == "decoder":
        args = (meta(n, net.cfg.c_in, hb, wb), meta(n), meta(n, net.cfg.effnet_embd, hc, wc, dtype=torch.float32),
                meta(n, 77, net.cfg.clip_embd))
        fn = lambda: net(*args)  # noqa: E731
    elif stage == "vqgan":
        args = (meta(batch, net.cfg.latent_channels, hb, wb),)
        fn = (lambda: net.decode(*args).float().clamp(0, 1)) if tile is None else \
            (lambda: _decode_tiled(net, *args, tile, tile // 4).clamp(0, 1))
    elif stage == "text":
        args = (torch.zeros(n, 77, dtype=torch.long, device="meta"),)
        fn = lambda: net(input_ids=args[0])  # noqa: E731
    else:
        raise ValueError(f"stage must be one of {(*STAGES, 'text')}, got {stage!r}")
    return trace_activations(fn, [*net.parameters(), *net.buffers(), *args])
