"""Speed and memory options that do not change the networks: fp8 weight storage, stage-at-a-time
offloading and compiled (static-shape, CUDA-graph) forwards.

None of these is on by default; the CLI and the nodes expose each as an option.
"""

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WuerstchenError

FP8 = torch.float8_e4m3fn


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in float8 (e4m3) and cast to the input dtype for each call.

    Halves the weight memory of a half-precision model; the matmul itself runs in the compute dtype.
    """

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def store_linear_weights_in_fp8(model: nn.Module) -> nn.Module:
    """Convert every Linear weight of `model` to float8 storage in place (biases, convs, norms keep
    their dtype). The Linear layers hold >99% of the Stage B/C parameters."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise WuerstchenError("fp8 weight storage needs torch ≥ 2.1 with float8 support; this torch has none.")
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Fp8Linear
            module.weight = nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
    return model


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


def tensor_slots(model: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """Every parameter and buffer slot of `model`: (its module's dict, name, the tensor there now).
    Module.to() either swaps a tensor's data in place (parameters between CPU and CUDA) or puts a new
    tensor in the slot (buffers, other devices); restore_slots undoes both."""
    return [(table, name, t) for m in model.modules() for table in (m._parameters, m._buffers)
            for name, t in table.items() if t is not None]


def restore_slots(slots, data) -> None:
    """Put each slot's original tensor object back, holding `data` (one tensor per slot)."""
    for (table, name, t), d in zip(slots, data):
        t.data = d
        table[name] = t


@contextlib.contextmanager
def compile_errors(where: str, enabled: bool = True):
    """Turn a torch.compile failure inside the block (it surfaces at the first call of a compiled
    model) into one clear WuerstchenError naming `where`. enabled=False: a plain block."""
    if not enabled:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        from torch._dynamo.exc import TorchDynamoException
        if not isinstance(e, TorchDynamoException):
            raise
        cause = getattr(e, "inner_exception", None) or e  # what the compiler backend raised
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        found = f"{type(cause).__name__}: {lines[0] if lines else 'no message'}"
        raise WuerstchenError(f"{where}: fast mode could not compile the network with torch.compile ({found}); "
                              "expected a working torch.compile (Triton on NVIDIA GPUs, a C++ compiler on the CPU), "
                              "or turn fast mode off.") from None


def compile_model(model: nn.Module, cuda_graphs: bool = True) -> nn.Module:
    """The pack's fast mode: compile the forward for static shapes.

    On CUDA "reduce-overhead" also captures CUDA graphs, which removes the per-kernel launch cost
    that dominates small latents (a 24×24 Stage C grid). Each new batch/size compiles once more.
    Returns a module with the same state dict keys (torch.compile wraps, it does not copy weights).
    """
    mode = "reduce-overhead" if cuda_graphs else "default"
    return torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
