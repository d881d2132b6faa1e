"""A small, ComfyUI-free description of a node: its inputs, outputs and a plain `execute` function.

`comfy_host.py` turns each NodeSpec into a V3 `io.ComfyNode`; the workflow runner validates and
executes the same specs without ComfyUI.
"""

from dataclasses import dataclass, field
from typing import Any, Callable

CATEGORY = "Wuerstchen v2"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# Socket types of this pack; everything else (IMAGE, LATENT, MASK, CONDITIONING) is ComfyUI's own.
PRIOR, DECODER, VQGAN, EFFNET, TEXT_ENCODER = (
    "WUERSTCHEN_PRIOR", "WUERSTCHEN_DECODER", "WUERSTCHEN_VQGAN", "WUERSTCHEN_EFFNET", "WUERSTCHEN_TEXT_ENCODER")


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # a widget type (WIDGET_TYPES) or a socket type
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple | Callable | None = None  # COMBO: a tuple, or a callable(host) -> list for file lists
    optional: bool = False
    multiline: bool = False
    control_after_generate: bool = False  # seed widgets: the UI adds a "fixed"/"randomize" widget after it
    upload: bool = False  # LoadImage's image list: the UI adds an "upload" widget after it

    @property
    def ui_extra_values(self) -> int:
        """widgets_values entries a UI workflow stores after this widget's own value."""
        return int(self.control_after_generate) + int(self.upload)

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def choices(self, host) -> list:
        return list(self.options(host) if callable(self.options) else self.options)

    def check(self, value, host) -> str | None:
        """Why `value` is not acceptable for this widget, or None."""
        if self.type == "COMBO":
            if not isinstance(value, str):
                return f"expected one of the listed names, got {type(value).__name__} {value!r}"
            choices = self.choices(host)
            if value not in choices:
                shown = ", ".join(map(repr, choices[:8])) + (", …" if len(choices) > 8 else "")
                return f"{value!r} is not in the list ({shown or 'the list is empty'})"
            return None
        if self.type == "BOOLEAN":
            return None if isinstance(value, bool) else f"expected true/false, got {value!r}"
        if self.type == "STRING":
            return None if isinstance(value, str) else f"expected text, got {type(value).__name__} {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {type(value).__name__} {value!r}"
        if self.type == "INT" and value != int(value):
            return f"expected a whole number, got {value!r}"
        if self.min is not None and value < self.min:
            return f"{value} is below the minimum {self.min}"
        if self.max is not None and value > self.max:
            return f"{value} is above the maximum {self.max}"
        return None


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    execute: Callable  # execute(host, **inputs) -> tuple | NodeResult
    output_node: bool = False
    category: str = CATEGORY

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.is_widget)


@dataclass
class NodeResult:
    """Outputs plus what the node shows in the UI: a text line, and/or saved/preview images."""
    outputs: tuple
    text: str | None = None
    images: list = field(default_factory=list)  # [{"filename", "subfolder", "type"}] for the standalone stand-ins


def result(value) -> NodeResult:
    return value if isinstance(value, NodeResult) else NodeResult(tuple(value))


def seed_input(name="seed", tooltip="Seed of image 0; image i of a batch uses seed + its batch index.") -> Input:
    return Input(name, "INT", tooltip, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)
