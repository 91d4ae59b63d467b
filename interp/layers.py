"""Stage 5 of the loop: choose the decoder layers a LoRA should touch.

`LayerSelection` is the hand-off to training: a contiguous window of language-decoder layers with the
evidence that chose it, mapped to other depths by relative position, and turned into a `peft.LoraConfig`
that can never reach the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interp._errors import InterpError

# The study's modules: attention q/k/v/o and MLP gate/up/down projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layers_pattern_of(layers_path: str) -> str:
    """PEFT ``layers_pattern`` for a decoder layer list: its last two path parts
    (``model.language_model.layers`` -> ``language_model.layers``), so a vision tower's
    ``encoder.layers`` never matches."""
    parts = layers_path.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else layers_path


def lora_config(layers: Any, *, layers_pattern: str = "language_model.layers", r: int = 16, alpha: int = 32,
                dropout: float = 0.05, target_modules: Any = DEFAULT_TARGET_MODULES, **peft_kwargs: Any):
    """A `peft.LoraConfig` adapting only the given language-decoder layers (the study's defaults)."""
    from peft import LoraConfig

    layer_list = sorted({int(i) for i in layers})
    if not layer_list:
        raise InterpError("lora_config needs at least one layer")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      layers_to_transform=layer_list, layers_pattern=layers_pattern, bias="none",
                      task_type="CAUSAL_LM", **peft_kwargs)


@dataclass(frozen=True)
class LayerSelection:
    """A contiguous window of decoder layers, with the per-layer scores that chose it."""

    layers: tuple[int, ...]
    n_layers: int
    scores: tuple[float, ...] = ()  # one score per layer of the model (empty when chosen by hand)
    method: str = "manual"
    peak: int | None = None  # the layer with the highest score
    layers_pattern: str = "language_model.layers"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise InterpError("a LayerSelection needs at least one layer")
        bad = [i for i in self.layers if not 0 <= i < self.n_layers]
        if bad:
            raise InterpError(f"layer {bad[0]} is outside a {self.n_layers}-layer model")

    @property
    def relative_depth(self) -> tuple[float, float]:
        """(first, last) layer as a fraction of depth: 15-19 of 34 -> (0.44, 0.56)."""
        return self.layers[0] / self.n_layers, self.layers[-1] / self.n_layers

    def to_depth(self, n_layers: int) -> LayerSelection:
        """The same relative window in a model with ``n_layers`` layers (15-19 of 34 -> 14-18 of 32)."""
        if n_layers < 1:
            raise InterpError(f"n_layers={n_layers} must be positive")
        width = len(self.layers)
        if width > n_layers:
            raise InterpError(f"a {width}-layer window does not fit in {n_layers} layers")
        center = (self.layers[0] + self.layers[-1] + 1) / 2 / self.n_layers  # window centre, relative
        start = int(round(center * n_layers - width / 2))
        start = min(max(start, 0), n_layers - width)
        peak = None if self.peak is None else min(int(self.peak / self.n_layers * n_layers), n_layers - 1)
        return LayerSelection(tuple(range(start, start + width)), n_layers, (), f"{self.method}->depth", peak,
                              self.layers_pattern, {"from": {"layers": list(self.layers), "n_layers": self.n_layers}})

    def lora_config(self, **peft_kwargs: Any):
        """A `peft.LoraConfig` on exactly these language-decoder layers (never the vision tower)."""
        peft_kwargs.setdefault("layers_pattern", self.layers_pattern)
        return lora_config(self.layers, **peft_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "n_layers": self.n_layers, "scores": list(self.scores),
                "method": self.method, "peak": self.peak, "relative_depth": list(self.relative_depth),
                "layers_pattern": self.layers_pattern}

    def __repr__(self) -> str:
        lo, hi = self.relative_depth
        return (f"LayerSelection(layers {self.layers[0]}-{self.layers[-1]} of {self.n_layers} "
                f"({lo:.0%}-{hi:.0%} depth), method={self.method!r}, peak={self.peak})")
