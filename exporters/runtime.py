"""Running float ONNX models: onnxruntime when it is installed, onnx's reference evaluator otherwise.

Exporters run float models for three things: folding a graph's shape computations (one
run that returns every intermediate tensor), calibration (selected intermediate tensors
over many samples) and comparison. onnxruntime is much faster; the reference evaluator
needs nothing beyond `onnx` and gives the same numbers to float rounding.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx

from .dyadic import ExportError

try:  # optional: `pip install refsim[export]`
    import onnxruntime as _ort
except ImportError:  # pragma: no cover - exercised only without onnxruntime
    _ort = None


def have_onnxruntime() -> bool:
    return _ort is not None


class FloatRunner:
    """A float ONNX model ready to run, exposing any intermediate tensors asked for.

    `expose` names intermediate tensors to return besides the graph outputs; `expose_all`
    returns every tensor a node produces (for shape and constant folding).
    """

    def __init__(self, model: onnx.ModelProto, expose: Iterable[str] = (), expose_all: bool = False):
        model_copy = onnx.ModelProto()
        model_copy.CopyFrom(model)
        existing = [o.name for o in model_copy.graph.output]
        wanted = list(existing)
        extra = [o for n in model_copy.graph.node for o in n.output if o] if expose_all else list(expose)
        for name in extra:
            if name not in wanted:
                wanted.append(name)
                info = onnx.ValueInfoProto()
                info.name = name
                model_copy.graph.output.append(info)
        self.output_names = wanted
        self.input_names = [i.name for i in model_copy.graph.input
                            if i.name not in {t.name for t in model_copy.graph.initializer}]
        if _ort is not None:
            options = _ort.SessionOptions()
            # Keep every tensor under its own name: no fusions that rename or remove them.
            options.graph_optimization_level = _ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
            try:
                self._session = _ort.InferenceSession(
                    model_copy.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            except Exception as e:  # onnxruntime raises its own exception types
                raise ExportError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None
            self._reference = None
            self._run_options = _ort.RunOptions()
            self._run_options.log_severity_level = 4  # a failing run is reported once, as an ExportError
        else:
            from onnx.reference import ReferenceEvaluator

            self._session = None
            self._reference = ReferenceEvaluator(model_copy)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every exposed tensor and graph output for one batch of feeds."""
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            if self._session is not None:
                values = self._session.run(self.output_names, dict(feeds), self._run_options)
            else:
                values = self._reference.run(self.output_names, dict(feeds))
        except Exception as e:
            raise ExportError(f"running the float model failed: {str(e).splitlines()[0]}") from None
        return {name: np.asarray(v) for name, v in zip(self.output_names, values)}
