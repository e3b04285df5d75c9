"""The pass lists of export and import, and `canonicalize`.

`canonicalize(model, input_shapes)` turns a float model as `torch.onnx.export` writes it
(the dynamo exporter, or the TorchScript one with LayerNorm and GELU decomposed; fixed or
symbolic batch and sequence) into a `Graph` in the quantizer's vocabulary, by running
`EXPORT_PASSES` in order, each a small function of the graph:

| pass | what it does |
|---|---|
| `fold_constants` | shape arithmetic, `Constant`s and every other node on constants folded; batch-dependent Reshape/Expand targets made fixed (`frontend.fold`) |
| `whole_selections` | `x[mask]`, `y[mask] = v` with a constant mask keeping every sample (X-MOD's language adapters at a fixed batch) -> Reshape; with an empty mask, nothing |
| `canonical_masks` | HF attention masks, whatever their chain, replaced by canonical expressions (`frontend.masks`) |
| `remove_identities` | Identity, Dropout, softmax NaN guards removed |
| `fuse_layernorm`, `fuse_gelu` | decomposed LayerNorm and GELU (erf or tanh form) -> `LayerNormalization`, `Gelu` |
| `l2_normalize` | x / max(||x||, eps) over the last axis (sentence-transformers' Normalize) -> the first half of `LayerNormalization([x, -x])` |
| `gemm_to_matmul` | `Gemm` -> `MatMul` + `Add` |
| `split_to_slices` | `Split` -> one `Slice` per part (TorchScript's `unbind` / `chunk` of a fused QKV projection) |
| `global_pools` | `GlobalAveragePool` -> `ReduceMean` over the spatial axes |
| `pointwise_convs` | a 1-D `Conv` with kernel 1 (any groups; SqueezeBERT) -> `Transpose` + `MatMul` (block-diagonal weight) + `Transpose` |
| `conv_patches` | a `Conv` whose stride is its kernel (a patch embedding) -> patch reshapes + `MatMul` |
| `constant_arithmetic` | `x - c` -> `x + (-c)`, `x / c` -> `x * (1/c)` |
| `fold_affine_into_linear` | per-channel `Mul`/`Add` right after a linear layer folded into it (NoNorm) |
| `drop_neutral` | `+ 0`, `* 1` removed |
| `compress_movement` | chains of Reshape/Transpose/Squeeze/Unsqueeze/Flatten -> the one they amount to |
| `split_fused_projections` | a linear layer whose output is moved and cut into parts (timm's fused QKV) -> one linear layer per part |

Shapes are inferred again after every pass (`frontend.shapes`). The canonical graph is then
checked against the original model on calibration data, at the shapes the graph declares
(`check_canonical`); a difference is an internal error, never silently accepted.

Import reads its graph with `import_graph`: the same loader, input shapes and folding (with
the nodes each format keeps, such as the DequantizeLinear of weights), then the importer
maps nodes onto integer ops.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx

from ..dyadic import ExportError
from ..runtime import FloatRunner
from .fold import NONDETERMINISTIC, batch_dependent_uses, fold_constants
from .graph import Graph, load
from .masks import canonical_masks
from .movement import compress_movement, split_fused_projections
from .rewrites import (
    constant_arithmetic,
    conv_patches,
    drop_neutral,
    fold_affine_into_linear,
    fuse_gelu,
    fuse_layernorm,
    gemm_to_matmul,
    global_pools,
    l2_normalize,
    pointwise_convs,
    remove_identities,
    split_to_slices,
    whole_selections,
)
from .shapes import bind_inputs, infer_shapes

MIN_OPSET = 20  # LayerNormalization (17) and Gelu (20) are ONNX ops from here on

# The op vocabulary of a canonical graph.
CANONICAL_OPS = (
    "Add", "Cast", "Clip", "Concat", "Div", "Expand", "Gather", "Gelu", "LayerNormalization",
    "MatMul", "Mul", "Neg", "Pad", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Sigmoid", "Slice", "Softmax",
    "Tanh", "Transpose", "Unsqueeze", "Where",
)

Pass = Callable[[Graph], None]

EXPORT_PASSES: tuple[Pass, ...] = (
    fold_constants,
    whole_selections,
    canonical_masks,
    remove_identities,
    fuse_layernorm,
    fuse_gelu,
    l2_normalize,
    gemm_to_matmul,
    split_to_slices,
    global_pools,
    pointwise_convs,
    conv_patches,
    constant_arithmetic,
    fold_affine_into_linear,
    drop_neutral,
    compress_movement,
    split_fused_projections,
)


def run_passes(g: Graph, passes: Iterable[Pass]) -> Graph:
    for p in passes:
        p(g)
        g.toposort()
        infer_shapes(g)
    return g


def upgrade_opset(model: onnx.ModelProto, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """The model converted to `opset` when it is older (TorchScript exports: opset 14-17)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ExportError("the model imports no standard ONNX opset")
    if version >= opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:
        raise ExportError(f"cannot convert the model from opset {version} to {opset}: {str(e).splitlines()[0]}") from None


def canonicalize(model, input_shapes: dict[str, Iterable[int]] | None = None) -> Graph:
    """The canonical graph of a float model (module docstring). `input_shapes` gives the
    size of each symbolic input dimension other than the batch (for example
    {"input_ids": [1, 128]}: the data's shape with a batch of one)."""
    proto = upgrade_opset(load(model))
    g = Graph.from_model(proto)
    for node in g.nodes:
        if not node.standard:
            raise ExportError(f"{node.describe()}: custom domain {node.domain!r} is not supported by refsim export "
                              f"(an already-quantized model? use refsim import)")
    g.bindings = bind_inputs(g, input_shapes, free_batch=True)
    drawn = next((n for n in g.nodes if n.op in NONDETERMINISTIC), None)
    try:
        run_passes(g, EXPORT_PASSES)
    except ExportError:
        if drawn is None:
            raise
        # the random op is the cause (ViTMAE's masking at a free batch leaves the shapes unknowable)
        raise _draws_random_numbers(drawn) from None
    drawn = next((n for n in g.nodes if n.op in NONDETERMINISTIC), None)
    if drawn is not None:  # ViTMAE's random patch masking: no integer model reproduces it, nor can it be checked
        raise _draws_random_numbers(drawn)
    batch_dependent_uses(g)
    return g


def _draws_random_numbers(node) -> ExportError:
    return ExportError(f"{node.describe()}: the model draws random numbers at inference ({node.op}); export it with the "
                       f"randomness as an input or fixed (ViTMAE: pass `noise`, or export the encoder without its random "
                       f"masking)")


def fixed_batch(g: Graph) -> int | None:
    """The batch size every input declares, or None when the batch is free."""
    sizes = {g.input_types[n][1][0] for n in g.inputs if g.input_types[n][1]}
    fixed = {s for s in sizes if isinstance(s, int)}
    return fixed.pop() if len(fixed) == 1 and fixed == sizes else None


def check_canonical(original, g: Graph, batches: list[dict[str, np.ndarray]], rtol: float = 1e-3) -> None:
    """The canonical graph against the original model on `batches` (calibration data at the
    declared shapes): the same outputs to `rtol` of their largest magnitude."""
    want_runner = FloatRunner(load(original))
    got_runner = FloatRunner(g.to_model())
    for feeds in batches:
        try:
            want = want_runner.run(feeds)
        except ExportError as e:
            shapes = ", ".join(f"{k}: {list(np.shape(v))}" for k, v in feeds.items())
            raise ExportError(f"the model itself fails on the calibration data ({shapes}): {e}; does it take these "
                              f"sizes? (text models: --max-length)") from None
        got = got_runner.run(feeds)
        for name in g.outputs:
            a = np.asarray(want[name], np.float64)
            b = np.asarray(got[name], np.float64)
            if a.shape != b.shape:
                raise ExportError(f"internal: the canonical graph changed the shape of output {name!r} "
                                  f"({a.shape} -> {b.shape}); please report this model")
            scale = max(float(np.abs(a).max()) if a.size else 0.0, 1e-6)
            worst = float(np.abs(a - b).max()) if a.size else 0.0
            if worst > rtol * scale:
                raise ExportError(
                    f"internal: the canonical graph's output {name!r} differs from the original by {worst:.3g} "
                    f"(largest |value| {scale:.3g}) on the calibration data; please report this model")


def import_graph(model, shapes: dict[str, Iterable[int]] | None = None, constants: dict | None = None,
                 keep: Callable | None = None, specs: dict | None = None) -> Graph:
    """A quantized model read for import: every node checked against its schema (onnx's, or
    the importer's `specs` for its custom ops), inputs bound, constants folded (except the
    nodes `keep` protects), shapes inferred."""
    g = Graph.from_model(load(model), specs)
    if constants:
        g.bind_constants(dict(constants))
    bind_inputs(g, shapes, free_batch=False)
    fold_constants(g, keep)
    return g

