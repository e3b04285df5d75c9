"""`refsim export`: a float ONNX model and calibration data in, an `.intq` integer model out.

    report = refsim.exporters.export("model.onnx", "model.intq", "calib.txt",
                                     tokenizer="tokenizer.json", mode="ibert", wbits=8)

Steps: canonicalize the ONNX graph (`frontend.passes`) and check it against the original on
calibration data, run the float model on the calibration data to observe every activation
(`calibrate`), walk the graph building the integer graph (`quantize`), and save it with
everything `refsim run` and `refsim compare` need: the tokenizer, labels, the float
boundary (`refsim.boundary`), the calibration data's fingerprint and the record from which
the fake-quant model is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from refsim import __version__
from refsim.intq import save
from refsim.text import DEFAULT_INPUTS, TextEncoder

from .calibrate import Calibration, calibrate
from .config import ExportOptions, LayerConfig
from .data import load_dataset, read_labels
from .dyadic import ExportError
from .fakequant import record_to_json
from .frontend.graph import Graph, load
from .frontend.masks import mask_derived
from .frontend.passes import canonicalize, check_canonical, fixed_batch
from .modes import Modes
from .progress import Progress
from .ptq.plan import Ptq
from .quantize import Walker
from .runtime import FloatRunner

TOKENIZER_BLOB = "tokenizer.json"
DEFAULT_MAX_LENGTH = 128


@dataclass
class ExportReport:
    path: str
    nodes: int
    file_bytes: int
    layers: list[str]
    samples: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.path}: {self.nodes} integer nodes, {self.file_bytes / 1e6:.2f} MB, "
                 f"calibrated on {self.samples} samples"]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def onnx_input_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _static_seq_length(model: onnx.ModelProto) -> int | None:
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in DEFAULT_INPUTS and len(dims) >= 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
            return int(dims[1].dim_value)
    return None


def _tokenizer_max_length(tokenizer_json: bytes) -> int | None:
    try:
        doc = json.loads(tokenizer_json)
    except ValueError:
        return None
    truncation = doc.get("truncation") if isinstance(doc, dict) else None
    if isinstance(truncation, dict) and isinstance(truncation.get("max_length"), int):
        return truncation["max_length"]
    return None


def make_encoder(tokenizer: str | os.PathLike | bytes | None, max_length: int | None, model: onnx.ModelProto):
    """(encoder, tokenizer bytes) or (None, None) without a tokenizer."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, bytes):
        data = tokenizer
    else:
        try:
            with open(tokenizer, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ExportError(f"{os.fspath(tokenizer)}: no such file") from None
    if max_length is None:
        max_length = _static_seq_length(model) or _tokenizer_max_length(data) or DEFAULT_MAX_LENGTH
    try:
        return TextEncoder(data, int(max_length)), data
    except Exception as e:
        raise ExportError(f"tokenizer: {e}") from None


def activation_tensors(g: Graph) -> list[str]:
    """Every float tensor the graph computes (or takes) that is not a mask expression."""
    masks = mask_derived(g)
    names = [n for n in g.inputs if g.dtypes.get(n, np.dtype(np.float32)).kind == "f"]
    for node in g.nodes:
        for out in node.outputs:
            if out not in masks and g.dtypes.get(out, np.dtype(np.float32)).kind == "f":
                names.append(out)
    return names


def linear_inputs(g: Graph) -> list[str]:
    """The activations entering linear layers (MatMul with constant 2-D weights)."""
    names = []
    for node in g.nodes:
        if node.op == "MatMul" and g.is_const(node.inputs[1]) and not g.is_const(node.inputs[0]):
            if g.const(node.inputs[1]).ndim == 2 and node.inputs[0] not in names:
                names.append(node.inputs[0])
    return names


def layernorm_inputs(g: Graph) -> list[str]:
    """The activations entering LayerNormalization nodes (their row variance is calibrated)."""
    return sorted({node.inputs[0] for node in g.nodes if node.op == "LayerNormalization"})


def padding_perturbation(g: Graph):
    """For a model with an attention-mask input: feeds -> the same feeds with other token
    ids where the mask is 0 (see `calibrate`); None for other models."""
    masks = sorted(g.mask_inputs)
    if not masks:
        return None
    ids = [n for n in g.inputs if n not in g.mask_inputs and g.dtypes.get(n, np.dtype(np.float32)).kind in "iu"]

    def perturbed(feeds):
        mask = feeds.get(masks[0])
        if mask is None:
            return feeds
        out = dict(feeds)
        for name in ids:
            x = feeds.get(name)
            if x is None or x.shape != mask.shape or int(np.max(x, initial=0)) <= 1:
                continue  # token type ids (0/1) stay: another value may not exist
            out[name] = np.where(mask == 0, np.where(x == 1, 2, 1), x).astype(x.dtype)
        return out

    return perturbed


def onnx_feed_dtypes(g: Graph) -> dict[str, np.dtype]:
    return {n: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(g.input_types[n][0])) for n in g.inputs}


CHECK_SAMPLES = 8  # calibration samples the canonical graph is checked on


def batch_size_for(g: Graph, wanted: int) -> tuple[int, bool]:
    """(samples per float-model run, whether every batch must have exactly that many): the
    graph's own batch size when it declares one."""
    fixed = fixed_batch(g)
    return (fixed, True) if fixed is not None else (wanted, False)


def prepare(model, data: str, tokenizer=None, max_length: int | None = None, input_shapes=None, check: bool = True):
    """Load the model and data; canonicalize the graph for the data's shapes and check it
    against the original on the first calibration samples."""
    proto = load(model)
    names = onnx_input_names(proto)
    encoder, tokenizer_bytes = make_encoder(tokenizer, max_length, proto)
    dataset = load_dataset(data, names, encoder)
    shapes = dict(input_shapes or {})
    for name in names:
        shapes.setdefault(name, [1] + list(dataset.arrays[name].shape[1:]))
    g = canonicalize(proto, shapes)
    if check:
        size, exact = batch_size_for(g, CHECK_SAMPLES)
        batches = dataset.batches(size, onnx_feed_dtypes(g), exact=exact)
        if not batches:
            raise ExportError(f"{dataset.source}: {len(dataset)} samples, but the model takes batches of {size}")
        check_canonical(proto, g, batches[:1])
    return proto, g, dataset, encoder, tokenizer_bytes, shapes


def build(
    model,
    calib: str | os.PathLike,
    *,
    mode: str = "ibert",
    wbits="8",
    abits: int = 8,
    per_channel: bool | None = None,
    calib_method: str = "mse",
    percentile: tuple[float, float] | None = None,
    smooth: bool | None = None,
    gptq: bool | None = None,
    bias_correction: bool = False,
    ita_channel_scales: bool = True,
    gelu: str | None = None,
    config: str | os.PathLike | dict | None = None,
    tokenizer: str | os.PathLike | bytes | None = None,
    max_length: int | None = None,
    labels: str | os.PathLike | list[str] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    max_samples: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    plan=None,
    calibration: Calibration | None = None,
) -> "Built":
    """Quantize an ONNX model with calibration data: the integer graph, not yet saved, and
    what made it (`export` saves it; `exporters.qat` trains its constants first).

    `plan(g, proto, build)`, called after calibration, returns the layer settings to use
    and metadata to store (`build(LayerConfig)` builds the integer graph; see
    `exporters.allocation.Planner`). `calibration`: the statistics an earlier build of the
    same model on the same data observed (`Built.calibration`), reused instead of running
    the float model again (the method and clips are this build's).
    """
    layers = config if isinstance(config, LayerConfig) else (
        LayerConfig.from_dict(config) if isinstance(config, dict) else LayerConfig.load(config))
    options = ExportOptions(mode=mode, wbits=str(wbits), abits=abits, per_channel=per_channel,
                            calib_method=calib_method, percentile=tuple(percentile) if percentile else None, layers=layers,
                            smooth=smooth, gptq=gptq, bias_correction=bias_correction,
                            ita_channel_scales=ita_channel_scales, gelu=gelu)
    bar = Progress(progress)
    proto, g, dataset, encoder, tokenizer_bytes, shapes = prepare(model, os.fspath(calib), tokenizer, max_length, input_shapes)
    if max_samples is not None:
        dataset = dataset.head(max_samples)
    tensors = activation_tensors(g)
    size, exact = batch_size_for(g, batch_size)
    if calibration is None:
        calibration = calibrate(lambda ts: FloatRunner(g.to_model(), expose=ts), tensors,
                                dataset.batches(size, onnx_feed_dtypes(g), exact=exact), options.calib_method,
                                options.percentile, bar, padding=padding_perturbation(g), layer_inputs=linear_inputs(g),
                                row_tensors=layernorm_inputs(g))
    else:
        calibration = calibration.with_method(options.calib_method, options.percentile)
    ptq = Ptq(options, calibration)
    ptq.choose_clips(g)
    extra_meta = {}
    if plan is not None:
        def trial_build(settings: LayerConfig):
            trial = options.with_(layers=settings)
            trial_walker = Walker(g, trial, calibration, Modes(trial), Ptq(trial, calibration))
            trial_builder = trial_walker.run()
            record_to_json(trial_walker.record, trial_builder.tensors)  # sets the constants' scales, as written
            return trial_builder.build()

        layers, extra_meta = plan(g, proto, trial_build)
        options = options.with_(layers=layers)
        ptq = Ptq(options, calibration)
        ptq.choose_clips(g)
    walker = Walker(g, options, calibration, Modes(options), ptq)
    builder = walker.run()
    warnings = []
    layer_names = sorted({n.scope for n in g.nodes if n.scope})
    for pattern in layers.unused_patterns(layer_names):
        warnings.append(f"{layers.source}: pattern {pattern!r} matches no layer")
    meta = builder.metadata
    label_list = labels if isinstance(labels, list) else (read_labels(os.fspath(labels)) if labels else None)
    if label_list:
        meta["labels"] = label_list
    if tokenizer_bytes is not None:
        builder.blobs[TOKENIZER_BLOB] = tokenizer_bytes
        mapping = {n: DEFAULT_INPUTS[n] for n in g.inputs if n in DEFAULT_INPUTS}
        meta["tokenizer"] = {"blob": TOKENIZER_BLOB, **encoder.settings(), "inputs": mapping}
    meta["boundary"] = boundary_metadata(g, builder)
    model_bytes = proto.SerializeToString()
    source_path = model if isinstance(model, (str, os.PathLike)) else None
    meta["source_model"] = {
        "file": os.path.basename(os.fspath(source_path)) if source_path else None,
        "sha256": _file_sha256(source_path) if source_path else hashlib.sha256(model_bytes).hexdigest(),
        "input_shapes": {k: [int(d) for d in v] for k, v in shapes.items()},
    }
    meta["export"] = {
        "refsim": __version__, "mode": options.mode, "wbits": options.wbits, "abits": options.abits,
        "per_channel": options.per_channel, "residual_bits": options.residual_bits, "output_bits": options.output_bits,
        "smooth": options.smooth, "gptq": options.gptq, "bias_correction": options.bias_correction,
        "ita_channel_scales": options.ita_channel_scales if options.ita else None, "gelu": options.gelu, "ptq": ptq.report,
        "layers": [[p, s] for p, s in layers.entries],
    }
    meta["calibration"] = {
        "method": options.calib_method, "percentile": list(options.percentile) if options.percentile else None,
        "source": os.path.basename(dataset.source), "samples": len(dataset), "digests": dataset.digests,
    }
    meta["fake_quant"] = record_to_json(walker.record, builder.tensors)
    meta["float_tensors"] = walker.float_tensors
    meta["layers"] = walker.layers
    if extra_meta:
        meta["bit_allocation"] = extra_meta
    return Built(builder.build(), g, walker, options, dataset, encoder, layer_names, warnings, calibration)


@dataclass
class Built:
    """An export before it is saved: the integer graph and what made it."""

    graph: object  # refsim.ir.Graph
    canonical: Graph
    walker: Walker
    options: ExportOptions
    dataset: object
    encoder: object
    layer_names: list[str]
    warnings: list[str]
    calibration: Calibration

    def save(self, output: str | os.PathLike) -> ExportReport:
        save(self.graph, output)
        return ExportReport(os.fspath(output), len(self.graph.nodes), os.path.getsize(output), self.layer_names,
                            len(self.dataset), self.warnings)


def export(model, output: str | os.PathLike, calib: str | os.PathLike, **options) -> ExportReport:
    """Quantize an ONNX model with calibration data and write the integer model to `output`.

    `options` are `build`'s (see `refsim export --help` for their meaning). Returns a
    report; raises ExportError (a RefsimError) with one line naming the node or layer at
    fault.
    """
    return build(model, calib, **options).save(output)


def boundary_metadata(g: Graph, builder) -> dict:
    """The float boundary (`refsim.boundary`): float inputs quantized with their calibrated
    scale, every output dequantized with its scale."""
    inputs, outputs = {}, {}
    for name in g.inputs:
        t = builder.tensors[name]
        if t.scale is not None:
            inputs[name] = {"dtype": t.dtype.name, "scale": float(t.scale), "zero_point": 0, "rounding": "half_even"}
    for source, tensor in zip(g.outputs, builder.outputs):
        t = builder.tensors[tensor]
        if t.scale is not None:
            outputs[source] = {"tensor": tensor, "dtype": t.dtype.name, "scale": t.scale, "zero_point": 0, "dequantize": True}
    return {"inputs": inputs, "outputs": outputs}


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
