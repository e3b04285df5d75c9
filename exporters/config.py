"""Export settings: global bit widths and mode, and `layers.json` overrides per layer.

A layer is named by the module path its nodes came from (`bert.encoder.layer.0.output.dense`,
`vit.layers.3.attention.q_proj`, `classifier`; `refsim export --list-layers` prints them).
`layers.json` maps glob patterns over these names (`fnmatch`: `*` matches anything,
including dots) to settings; every matching entry applies, later entries override earlier
ones:

    {
      "*.output.dense": {"abits": 16},
      "*.attention.self.*": {"wbits": 4},
      "classifier": "keep_float"
    }

(or the same mapping under a top-level "layers" key). Settings:

- `wbits`: 2..8, 16 or "ternary" for the layer's weights; for an embedding table, its bits;
- `abits`: 2..8 or 16, the bits of the activation entering the layer's matrix product;
- `per_channel`: true/false, per-output-channel weight scales;
- `keep_float` (or the string "keep_float"/"float" as the whole setting): the closest an
  integer graph gets to not quantizing a layer. A linear layer gets 16-bit per-channel
  weights, a 16-bit input and a 64-bit accumulator (relative error ~1e-4); an elementwise
  activation (GELU, Tanh) becomes a 65536-entry table on a 16-bit input, exact to its 16-bit
  output; a LayerNorm or softmax keeps its integer algorithm but its output gets 16 bits
  where the op allows. Nothing in the integer graph computes in floating point.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .dyadic import ExportError

MODES = ("ibert", "ita", "ita-partial")
GELU_CHOICES = ("table", "ibert")  # ibert mode's GELU (ExportOptions.gelu)
ACTIVATION_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
WEIGHT_BITS = ("2", "3", "4", "5", "6", "7", "8", "16", "ternary")
# The IR's signed types; a width between two of them is held in the wider one, clipped.
_SIGNED_TYPES = (2, 4, 8, 16, 32)


def signed_type(bits: int) -> tuple[str, int, int]:
    """The narrowest IR type holding signed `bits`-bit integers, and their range
    (3 bits live in int4, 5 to 7 in int8: clipped to [-2^(b-1), 2^(b-1) - 1])."""
    width = next((w for w in _SIGNED_TYPES if w >= bits), None)
    if bits < 2 or width is None:
        raise ExportError(f"no integer type for {bits}-bit values")
    return f"int{width}", -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class LayerSettings:
    wbits: str  # "2".."8", "16" or "ternary"
    abits: int
    per_channel: bool
    keep_float: bool = False


def parse_wbits(value) -> str:
    text = str(value).lower()
    if text not in WEIGHT_BITS:
        raise ExportError(f"weight bits must be 2..8, 16 or ternary; got {value!r}")
    return text


def parse_abits(value) -> int:
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = -1
    if bits not in ACTIVATION_BITS:
        raise ExportError(f"activation bits must be 2..8 or 16; got {value!r}")
    return bits


def read_json(path: str) -> object:
    """A JSON file the user named, or an ExportError saying what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON: {e}") from None


@dataclass
class LayerConfig:
    """Ordered (pattern, settings) entries from layers.json."""

    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    source: str = "layers.json"

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "LayerConfig":
        if path is None:
            return cls()
        path = os.fspath(path)
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, doc, source: str = "layers.json") -> "LayerConfig":
        if isinstance(doc, dict) and "layers" in doc:
            doc = doc["layers"]
        if not isinstance(doc, dict):
            raise ExportError(f"{source}: expected an object mapping layer patterns to settings")
        entries = []
        for pattern, setting in doc.items():
            if isinstance(setting, str) and setting.lower() in ("keep_float", "float", "keep float"):
                setting = {"keep_float": True}
            if not isinstance(setting, dict):
                raise ExportError(f"{source}: {pattern!r}: a setting must be an object or \"keep_float\", got {setting!r}")
            unknown = set(setting) - {"wbits", "abits", "per_channel", "keep_float"}
            if unknown:
                raise ExportError(f"{source}: {pattern!r}: unknown setting(s) {sorted(unknown)} "
                                  f"(known: wbits, abits, per_channel, keep_float)")
            checked = dict(setting)
            try:
                if "wbits" in checked:
                    checked["wbits"] = parse_wbits(checked["wbits"])
                if "abits" in checked:
                    checked["abits"] = parse_abits(checked["abits"])
            except ExportError as e:
                raise ExportError(f"{source}: {pattern!r}: {e}") from None
            for key in ("per_channel", "keep_float"):
                if key in checked and not isinstance(checked[key], bool):
                    raise ExportError(f"{source}: {pattern!r}: {key} must be true or false")
            entries.append((str(pattern), checked))
        return cls(entries, source)

    def matching(self, layer: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for pattern, setting in self.entries:
            if fnmatch.fnmatchcase(layer, pattern):
                merged.update(setting)
        return merged

    def unused_patterns(self, layers: list[str]) -> list[str]:
        return [p for p, _ in self.entries if not any(fnmatch.fnmatchcase(layer, p) for layer in layers)]


@dataclass
class ExportOptions:
    """Everything `export` needs to know besides the model and the data."""

    mode: str = "ibert"
    wbits: str = "8"
    abits: int = 8
    per_channel: bool | None = None  # None: per channel, except on ITA (one multiplier per layer)
    calib_method: str = "mse"
    percentile: tuple[float, float] | None = None
    layers: LayerConfig = field(default_factory=LayerConfig)
    # SmoothQuant-style smoothing of linear-layer inputs and GPTQ rounding of their weights
    # (exporters.ptq); None: on, except in the ITA modes (ITA's requantizer has one
    # multiplier per layer, and its block forms quantize weights by rounding)
    smooth: bool | None = None
    gptq: bool | None = None
    bias_correction: bool = False
    # ITA modes: per-column factors folded into the weights of ITA layers that feed the
    # residual stream, undone by the 16-bit residual Add (Modes.ita_output_channels)
    ita_channel_scales: bool = True
    # ibert mode's GELU: "table" (LutInterp16, the float GELU interpolated in an int16
    # table, as TFLite Micro / CMSIS-NN run int16 activations) or "ibert" (I-BERT's
    # i-GELU polynomial); None: "table". The ITA modes run ITAGelu, ITA's GELU unit.
    gelu: str | None = None
    residual_bits: int = 16  # residual stream, LayerNorm inputs, concatenations
    output_bits: int = 16  # graph outputs
    embedding_bits: str = "8"  # embedding tables unless layers.json says otherwise

    def __post_init__(self):
        if self.mode not in MODES:
            raise ExportError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        self.wbits = parse_wbits(self.wbits)
        self.abits = parse_abits(self.abits)
        if self.per_channel is None:
            self.per_channel = not self.ita
        if self.smooth is None:
            self.smooth = not self.ita
        if self.gptq is None:
            self.gptq = not self.ita
        if self.gelu is not None and self.gelu not in GELU_CHOICES:
            raise ExportError(f"unknown GELU {self.gelu!r}; choose from {', '.join(GELU_CHOICES)}")
        if self.ita and self.gelu is not None:
            raise ExportError(f"gelu={self.gelu!r} is an ibert-mode choice; mode {self.mode} runs ITAGelu, ITA's GELU unit")
        if self.gelu is None and not self.ita:
            self.gelu = "table"

    @property
    def ita(self) -> bool:
        return self.mode in ("ita", "ita-partial")

    def layer(self, scope: str) -> LayerSettings:
        """Settings for a linear layer named `scope`."""
        s = self.layers.matching(scope)
        if s.get("keep_float"):
            return LayerSettings("16", 16, True, True)
        return LayerSettings(s.get("wbits", self.wbits), s.get("abits", self.abits), s.get("per_channel", self.per_channel))

    def embedding(self, scope: str) -> LayerSettings:
        s = self.layers.matching(scope)
        if s.get("keep_float"):
            return LayerSettings("16", 16, False, True)
        return LayerSettings(s.get("wbits", self.embedding_bits), s.get("abits", self.abits), False)

    def activation_bits(self, scope: str, default: int) -> int:
        """Input bits of an elementwise function named `scope` (16 when kept float)."""
        s = self.layers.matching(scope)
        if s.get("keep_float"):
            return 16
        return s.get("abits", default)

    def with_(self, **changes) -> "ExportOptions":
        return replace(self, **changes)
