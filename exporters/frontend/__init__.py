"""The ONNX front end that `refsim export` and `refsim import` share.

- `graph`: one graph type (`Graph`, `Node`) and loader (`load`), back to ONNX with `to_model`;
- `shapes`: input shapes from the graph's declared dims and `dim_param` names, every other
  shape from ONNX shape inference; a free batch stays symbolic (`"batch"`, `"batch*4"`);
- `fold`: constant folding with shape arithmetic kept symbolic in the batch size;
- `passes`: the pass lists (`EXPORT_PASSES`; `import_graph`), `canonicalize`,
  `check_canonical`; the passes themselves in `masks`, `rewrites`, `movement`;
- `patterns`: linear layers and self-attention in a canonical graph;
- `emitter`: the one emitter of integer nodes on `refsim.GraphBuilder`;
- `requant`: the one requantization planner (`dyadic`, `ort`, `ita` policies, one bit rule).
"""
