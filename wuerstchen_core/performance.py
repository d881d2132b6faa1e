"""Speed and memory options that do not change the networks: fp8 weight storage, stage-at-a-time
offloading, compiled (static-shape, CUDA-graph) forwards, eager forwards replayed from CUDA graphs, and
GELU + GRN as Triton kernels.

None of these is on by default; the CLI and the nodes expose each as an option, except the GELU + GRN
fusion (fuse_gelu_grn), an experiment until a GPU run measures it.
"""

import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import WuerstchenError
from .memory import tensor_slots
from .models.common import ChannelMLP, run_unit
from .models.vqgan import PaellaVQGAN

log = logging.getLogger(__name__)  # ComfyUI shows INFO records in its console; the CLI on a terminal

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in float8 (e4m3).

    By default the weight is cast to the input dtype for each call: half the weight memory of a
    half-precision model, the matmul itself in the compute dtype. With `fp8_matmul` (ComfyUI's
    "fp8_e4m3fn_fast") the matmul runs on fp8 tensor cores instead: the input is scaled per row into
    e4m3 and multiplied with the stored weight, accumulating in fp32 (fp8_linear). Lossy; Linears whose
    sizes fp8 matmuls cannot take (not multiples of 16) keep the cast.
    """

    fp8_matmul = False

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.fp8_matmul and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            return fp8_linear(x, self.weight, bias)
        return F.linear(x, self.weight.to(x.dtype), bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·weightᵀ + bias on fp8 tensor cores: weight [N,K] in e4m3 as stored, each row of x scaled so its
    largest magnitude becomes FP8_MAX and rounded to e4m3, the product rescaled per row. The output is
    bfloat16 (the only one per-row-scaled fp8 matmuls give on CUDA), then x's dtype."""
    if not torch.compiler.is_compiling():  # traced once, in fast mode; the compiler reports an unfit GPU itself
        check_fp8_matmul_device(x.device)
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().amax(dim=1, keepdim=True).float()
    scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX  # [M,1]; an all-zero row stays zero
    q = (rows / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    ones = torch.ones(1, weight.shape[0], device=x.device)  # the weight is stored unscaled
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=ones, out_dtype=torch.bfloat16).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def check_fp8_matmul_device(device: torch.device) -> None:
    """Raise a WuerstchenError where fp8_linear cannot run: a CUDA GPU older than Hopper (the CPU can)."""
    if device.type == "cuda" and not _hopper_or_newer(device):
        raise WuerstchenError(f"fp8 matmul (fp8_e4m3fn_fast) on {torch.cuda.get_device_name(device)}: per-row "
                              "scaled fp8 matmuls need an NVIDIA GPU of compute capability 9.0 or newer (Hopper); "
                              "use fp8_e4m3fn (fp8 storage only) on this GPU.")


@functools.cache
def _hopper_or_newer(device: torch.device) -> bool:  # asked once per device, not at every Linear call
    return torch.cuda.get_device_capability(device) >= (9, 0)


def store_linear_weights_in_fp8(model: nn.Module, matmul: bool = False) -> nn.Module:
    """Convert every Linear weight of `model` to float8 storage in place (biases, convs, norms keep
    their dtype). The Linear layers hold >99% of the Stage B/C parameters. matmul: multiply them in
    fp8 too (Fp8Linear.fp8_matmul), a model already in fp8 storage included."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise WuerstchenError("fp8 weight storage needs torch ≥ 2.1 with float8 support; this torch has none.")
    if matmul and not hasattr(torch, "_scaled_mm"):
        raise WuerstchenError("fp8 matmul (fp8_e4m3fn_fast) needs a torch with torch._scaled_mm; this torch has none.")
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Fp8Linear
            module.weight = nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
        if type(module) is Fp8Linear:
            module.fp8_matmul = matmul
    return model


def fuse_gelu_grn(enabled: bool = True, device_types: Sequence[str] = ("cuda",)) -> None:
    """Run the Stage B/C channel MLPs' GELU + GRN as kernels.gelu_grn (three Triton kernels) on tensors of
    `device_types`, in every network, eager and compiled; enabled=False restores the plain modules.
    Off by default: the kernels are an experiment until a GPU run shows them faster than fast mode's
    compiled ops (docs/benchmarks.md). The CPU runs them only in Triton's interpreter."""
    if not enabled:
        ChannelMLP.fused_gelu_grn.clear()
        return
    try:
        from .kernels import gelu_grn
    except ImportError as e:
        raise WuerstchenError(f"The fused GELU + GRN kernels need triton ({e}); expected a torch build that brings "
                              "triton (the CUDA builds on Linux do), or leave the fusion off.") from None
    ChannelMLP.fused_gelu_grn.update(dict.fromkeys(device_types, gelu_grn))


@contextlib.contextmanager
def on_device(model: nn.Module, device, stream: Sequence[nn.Module] = ()):
    """Stage-at-a-time (low-VRAM) execution: `model`'s weights are on `device` only inside the block.

    The host copy stays the model's home: it is pinned once (so uploads run at full PCIe speed and
    asynchronously), uploaded on entry and simply put back on exit; the device copy is dropped, never
    copied back. A no-op when `device` is the CPU or the weights already live on `device`.

    stream: submodules that run once per call, in order (a text encoder's layers). Each is uploaded
    just before its forward and dropped right after it, so the device holds the rest of the model and
    one of them; the bytes uploaded are the same, only the peak is lower. Not for networks called
    once per sampling step, which would upload every step.
    """
    device = torch.device(device)
    tensors = [*model.parameters(), *model.buffers()]
    if device.type == "cpu" or all(t.device.type == device.type for t in tensors):
        yield model
        return
    if device.type == "cuda":
        for t in tensors:
            if t.device.type == "cpu" and not t.is_pinned():
                t.data = t.data.pin_memory()
    slots = tensor_slots(model)
    home = [t.data for _, _, t in slots]
    part_slots = [tensor_slots(part) for part in stream]
    streamed = {id(t) for slots_of_part in part_slots for _, _, t in slots_of_part}
    hooks = []
    try:
        _upload([slot for slot in slots if id(slot[2]) not in streamed], device)
        for part, slots_of_part in zip(stream, part_slots):
            part_home = [t.data for _, _, t in slots_of_part]
            hooks += [part.register_forward_pre_hook(lambda *_, s=slots_of_part: _upload(s, device)),
                      part.register_forward_hook(lambda *_, s=slots_of_part, h=part_home: restore_slots(s, h))]
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        restore_slots(slots, home)


def _upload(slots, device) -> None:
    """Put a device copy of each slot's tensor in the slot, as Module.to does (a parameter keeps its
    object where the tensor types allow, e.g. CPU -> CUDA); restore_slots undoes it."""
    for table, name, t in slots:
        copy = t.data.to(device, non_blocking=True)
        if isinstance(t, nn.Parameter) and torch._has_compatible_shallow_copy_type(t.data, copy):
            t.data = copy
        elif isinstance(t, nn.Parameter):
            table[name] = nn.Parameter(copy, requires_grad=t.requires_grad)
        else:
            table[name] = copy


def restore_slots(slots, data) -> None:
    """Put each slot's original tensor object back, holding `data` (one tensor per slot)."""
    for (table, name, t), d in zip(slots, data):
        t.data = d
        table[name] = t


FAST_MODE_SHAPES = 64  # image sizes and batches fast mode compiles for per process
UNIT_GRAPHS = 32  # bound on the compiled unit graphs one size adds (the public networks: Stage C 1, B 13, A 2)


def recompile_limit_setting() -> str:
    """The name of dynamo's compiles-per-function limit in this torch's config (older torch: cache_size_limit)."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


@contextlib.contextmanager
def compile_errors(where: str, enabled: bool = True):
    """The block fast-mode models run in: a torch.compile failure inside it (it surfaces at the first call
    of a compiled model) becomes one clear WuerstchenError naming `where`, and fast mode may compile for
    up to FAST_MODE_SHAPES sizes and batches (each compiles its unit graphs once more, all of them one
    function's compiles to dynamo, whose default limit of 8 would end a fullgraph compile outright).
    enabled=False: a plain block."""
    if not enabled:
        yield
        return
    from torch._dynamo import exc

    limit = recompile_limit_setting()
    graphs = max(FAST_MODE_SHAPES * UNIT_GRAPHS, getattr(torch._dynamo.config, limit))
    total = f"accumulated_{limit}"
    patch = {limit: graphs} | ({total: max(graphs, getattr(torch._dynamo.config, total))}
                               if hasattr(torch._dynamo.config, total) else {})
    try:
        with torch._dynamo.config.patch(patch):
            yield
    except RuntimeError as e:
        if not isinstance(e, exc.TorchDynamoException):
            raise
        cause = getattr(e, "inner_exception", None) or e  # what the compiler backend raised
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        found = f"{type(cause).__name__}: {lines[0] if lines else 'no message'}"
        raise WuerstchenError(f"{where}: fast mode could not compile the network with torch.compile ({found}); "
                              "expected a working torch.compile (Triton on NVIDIA GPUs, a C++ compiler on the CPU), "
                              "or turn fast mode off.") from None
    except getattr(exc, "FailOnRecompileLimitHit", ()):  # not a RuntimeError
        raise WuerstchenError(f"{where}: fast mode has compiled the networks for about {FAST_MODE_SHAPES} image "
                              "sizes and batches in this session, the most it keeps; expected fewer different "
                              "sizes, or restart to compile anew, or turn fast mode off.") from None


@functools.cache
def compiled_unit():
    """models.common.run_unit compiled (fullgraph, static shapes), one function for all networks: dynamo
    traces a unit's code once and reuses the graph for every unit of the same blocks and shapes (the
    parameters are graph inputs), so Stage C's 32 triples compile one graph per size, where compiling
    the whole network traced and compiled each of them (3–4× the compile time, measured on the CPU)."""
    return torch.compile(run_unit, fullgraph=True, dynamic=False)


def compile_model(model: nn.Module, cuda_graphs: bool = True) -> nn.Module:
    """The pack's fast mode: the network's repeated units compiled for static shapes (compiled_unit).

    Stage B and C become a CompiledNetwork: on CUDA (cuda_graphs) each step, compiled units and the
    few eager operations around them, is replayed from a CUDA graph, which removes the per-kernel launch
    cost that dominates small latents (a 24×24 Stage C grid). The Stage A VQGAN becomes a CompiledVQGAN
    (no CUDA graphs). Each new batch/size compiles once more. The wrappers hold the model, not a copy.
    """
    if isinstance(model, PaellaVQGAN):
        return CompiledVQGAN(model)
    return CompiledNetwork(model, cuda_graphs)


class _Wrapper(nn.Module):
    """A module around `model` that answers for it: cfg, condition(), decode()... of the wrapped network."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet (copy, unpickling): no recursion
                raise
            return getattr(self.model, name)


class _AnnouncedFirstRuns:
    """Logs the first call of each input shape, which compiles (torch.compile's wait is otherwise a
    sampler stuck at step 0 for a minute), and how long it took: `first_run(x, call)`."""

    stage = "the network"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shapes_run = set()

    def first_run(self, x, call):
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self._shapes_run:
            return call()
        shape = "×".join(map(str, x.shape))
        log.info("Würstchen fast mode: preparing %s for input %s (it compiles on the first run of each size and "
                 "batch in this session, then reuses that)", self.stage, shape)
        start = time.perf_counter()
        out = call()
        self._shapes_run.add(key)
        log.info("Würstchen fast mode: %s for input %s ready after %.1f s", self.stage, shape,
                 time.perf_counter() - start)
        return out


class CompiledVQGAN(_AnnouncedFirstRuns, _Wrapper):
    """Stage A in fast mode: decode() runs each MixingResidualBlock through compiled_unit: the 12
    bottleneck blocks share one compile per shape, so a size compiles two block graphs. Compiled, a
    block's LayerNorms, modulations, padding and residual updates fuse into a few kernels; eager, each is
    a pass over the map (Stage A at batch 8 ran its LayerNorms at ≈ 0.9 TB/s on an H200,
    docs/benchmarks-history.md, run 13). No CUDA graphs: a decode runs once per image and is not
    launch-bound. Encoding stays eager."""

    stage = "Stage A's blocks"

    def decode(self, latent):
        return self.first_run(latent, lambda: self.model.decode(latent, run_unit=compiled_unit()))


@dataclass
class _Captured:
    """One captured step: its static inputs (refilled before each replay), output and replay."""
    x: torch.Tensor
    r: torch.Tensor
    leaves: list  # the conditioning's tensors (None where the conditioning has None)
    out: torch.Tensor
    replay: object
    run: int = -1  # the sampling run whose conditioning `leaves` hold


class GraphedNetwork(_Wrapper):
    """Stage B or C whose sampling step is replayed from a CUDA graph: the eager kernels are captured
    once per input shape and replayed at every later step, removing the per-kernel launch cost that
    bounds an eager step at small batches, without compiling (capturing takes three eager forwards). The
    kernels and results are the eager ones (fast mode's CompiledNetwork captures compiled units instead).

    A step is `model(x, r, cond=model.condition(...))` with the conditioning prepared once per run (as
    the samplers call it): a new `cond` object marks a new run, whose tensors are copied into the
    captured graph's inputs once. Graphs hold the weights' addresses, so they are dropped when the
    weights move or change dtype (offloading, the fp16 fallback); at most `max_graphs` shapes are kept.
    Anything else (CPU, autograd, no prepared `cond`) runs the plain eager forward.
    """

    graphs = True  # whether steps on GRAPH_DEVICES are captured (CompiledNetwork without CUDA graphs: no)
    option = "cuda_graphs / --cuda-graphs"  # what a user turns off when a capture fails

    def __init__(self, model: nn.Module, max_graphs: int = 4):
        super().__init__(model)
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        # the current run's conditioning (held until the next run starts), its tensors and signature
        self._cond, self._leaves, self._cond_key, self._run, self._weights = None, [], None, 0, None
        self._pool, self._slots = None, None

    def forward(self, x, r, *args, cond=None, **kwargs):
        if (cond is None or args or kwargs or not self.graphs or x.device.type not in GRAPH_DEVICES
                or torch.is_grad_enabled()):
            return self.run_model(x, r, *args, cond=cond, **kwargs)
        if cond is not self._cond:
            self._new_run(cond)
        key = (x.shape, x.stride(), x.dtype, x.device, r.shape, r.dtype, self._cond_key)
        step = self._graphs.get(key)
        if step is None:
            step = self._graphs[key] = self._capture(x, r)
        self._graphs.move_to_end(key)
        if step.run != self._run:
            for static, t in zip(step.leaves, self._leaves):
                if static is not None:
                    static.copy_(t)
            step.run = self._run
        step.x.copy_(x)
        step.r.copy_(r)
        step.replay()
        return step.out.clone()  # the next replay overwrites `out`

    def _new_run(self, cond) -> None:
        leaves, spec = tree_flatten(cond)
        self._cond, self._leaves, self._run = cond, leaves, self._run + 1
        self._cond_key = (spec, tuple((t.shape, t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t
                                      for t in leaves))
        weights = self._weight_addresses()
        if weights != self._weights:  # captured graphs would read the old addresses
            self._graphs.clear()
            self._weights = weights

    def _weight_addresses(self) -> tuple:
        """(address, dtype) of every parameter and buffer as its module holds it now: a tensor put into a
        module's slot and data swapped in place both show. The slots are listed once, since walking the
        modules at every run start (state_dict) took 1.6 / 2.8 ms for Stage C / B on this project's CPU,
        with the device idle, against ≈ 0.2 ms through the listed slots."""
        if self._slots is None:
            self._slots = tensor_slots(self.model)
        return tuple((table[name].data_ptr(), table[name].dtype) for table, name, _ in self._slots)

    def _capture(self, x, r) -> _Captured:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        # plain (not inference-mode) static tensors: refilled in place under either mode
        with torch.inference_mode(False), torch.no_grad():
            static_x, static_r = x.clone(), r.clone()
            leaves = [t.clone() if isinstance(t, torch.Tensor) else None for t in self._leaves]
            cond = tree_unflatten([s if s is not None else t for s, t in zip(leaves, self._leaves)],
                                  self._cond_key[0])

            def step():
                return self.run_model(static_x, static_r, cond=cond)

            # one memory pool for all of this network's graphs: safe for graphs that never replay at the
            # same time and do not read each other's outputs, in any order (pytorch/pytorch#166975)
            try:
                out, replay, self._pool = capture_cuda_graph(step, x.device, self._pool)
            except RuntimeError as e:
                if isinstance(e, (torch._dynamo.exc.TorchDynamoException, torch.OutOfMemoryError)):
                    raise  # a compile failure is compile_errors's to report; out of memory is the host's to handle
                found = (str(e).strip().splitlines() or ["no message"])[0]
                raise WuerstchenError(f"CUDA graphs: capturing a {type(self.model).__name__} step of shape "
                                      f"{tuple(x.shape)} failed ({type(e).__name__}: {found}); expected a CUDA "
                                      f"device and driver that capture graphs, or turn {self.option} off.") from None
        return _Captured(static_x, static_r, leaves, out, replay)

    def run_model(self, *args, **kwargs):
        """One forward of the wrapped network, as captured and as run where no graph is."""
        return self.model(*args, **kwargs)


class CompiledNetwork(_AnnouncedFirstRuns, GraphedNetwork):
    """Stage B or C in fast mode: the forward runs its units through compiled_unit, and on CUDA
    (cuda_graphs) each step is captured whole, the compiled units' kernels with the eager operations
    between them, and replayed like GraphedNetwork's (the units compile in the warm-up runs before the
    capture). Without CUDA graphs: the compiled units, launched one by one."""

    option = "fast_mode / --fast"

    def __init__(self, model: nn.Module, cuda_graphs: bool = True):
        super().__init__(model)
        self.graphs = cuda_graphs
        self.stage = _STAGES.get(type(model).__name__, type(model).__name__)

    def forward(self, x, r, *args, **kwargs):
        return self.first_run(x, lambda: super(CompiledNetwork, self).forward(x, r, *args, **kwargs))

    def run_model(self, *args, **kwargs):
        return self.model(*args, run_unit=compiled_unit(), **kwargs)


GRAPH_DEVICES = ("cuda",)
_STAGES = {"WuerstchenPrior": "the Stage C prior", "WuerstchenDecoder": "the Stage B decoder"}


def capture_cuda_graph(step, device, pool=None):
    """Run `step` twice on a side stream (cuBLAS/cuDNN pick their kernels and allocate workspaces
    outside the capture), then capture it into `pool` (a new one if None): (its static output, the
    graph's replay, the pool)."""
    with torch.cuda.device(device):
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(), step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
    return out, graph.replay, pool
