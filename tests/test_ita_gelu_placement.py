"""The ITA modes on an encoder layer with a DeBERTa-style pooler: which GELUs are ITA's
(`Modes.on_ita_gelu`), and the fake-quant record of ITA's blocks.

ITA has a GELU only between the two layers of its feed-forward layer (docs/ITA.md). The
model (unmasked two-head self-attention, a feed-forward layer, then the first token through
a linear layer and a GELU, then a classifier) keeps ITAGelu for the feed-forward layer; the
pooler's GELU, no step of ITA's, runs beside ITA with ibert mode's table GELU, so the integer
model stays as close to its fake-quant model as the rest of the graph lets it.

The fake-quant model replaces each weight and bias by its integers times its scale: the
attention block's per-head weights joined again (`{"concat": ...}`), FF2's columns scaled
back by their factors c (`Modes.ita_output_channels`). Each must be the float constant to
within half its own quantization step, column by column.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import refsim
from refsim.exporters import compare, export
from refsim.exporters.fakequant import fake_quant_graph
from refsim.exporters.frontend.graph import load
from refsim.exporters.frontend.passes import canonicalize

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

S, E, H, F = 64, 128, 2, 256  # ITA's shapes are multiples of 64: two heads of 64
P = E // H


class _Pooled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(E, E) for _ in range(4))
        self.norm = torch.nn.LayerNorm(E)
        self.fc1, self.fc2 = torch.nn.Linear(E, F), torch.nn.Linear(F, E)
        self.pool, self.classifier = torch.nn.Linear(E, E), torch.nn.Linear(E, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
            self.norm.weight.add_(1.0)
            self.classifier.weight.mul_(20)  # spread the logits so top-1 means something

    def heads(self, t):
        return t.view(1, S, H, P).transpose(1, 2)

    def forward(self, x):
        scores = self.heads(self.q(x)) @ self.heads(self.k(x)).transpose(-1, -2) / P ** 0.5
        context = (torch.softmax(scores, -1) @ self.heads(self.v(x))).transpose(1, 2).reshape(1, S, E)
        x = x + self.o(context)
        h = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        return self.classifier(torch.nn.functional.gelu(self.pool(h[:, 0])))


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ita_gelu")
    model = root / "pooled.onnx"
    torch.onnx.export(_Pooled().eval(), (torch.randn(1, S, E),), model, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"])
    rng_c, rng_e = np.random.default_rng(1), np.random.default_rng(2)
    np.save(root / "calib.npy", rng_c.standard_normal((16, S, E)).astype(np.float32))
    np.save(root / "eval.npy", rng_e.standard_normal((16, S, E)).astype(np.float32))
    return root, model


def _exported(pooled, mode):
    root, model = pooled
    out = root / f"pooled_{mode}.intq"
    export(model, out, root / "calib.npy", mode=mode)
    return refsim.load(out), compare(model, out, root / "eval.npy")


@pytest.mark.parametrize("mode", ["ita", "ita-partial"])
def test_only_the_feedforward_gelu_is_itas(pooled, mode):
    m, report = _exported(pooled, mode)
    ops = collections.Counter(n.op for n in m.graph.nodes)
    assert ops["ITAGelu"] == 1 and ops["LutInterp16"] == 1, ops
    assert m.metadata["feedforward_blocks"][0]["activation"]["op"] == "gelu"
    table = next(n for n in m.graph.nodes if n.op == "LutInterp16")
    assert m.graph.tensors[table.inputs[0]].dtype.name == "int16"
    # The pooler's linear layer keeps ITA's arithmetic: 26 bits, saturating.
    producers = m.graph.producers()
    requant = producers[table.inputs[0]]
    while requant.op != "MatMul":
        requant = producers[requant.inputs[0]]
    assert requant.attrs["acc_bits"] == 26 and requant.attrs["overflow"] == "saturate"
    pair = report.outputs["logits"]["integer vs fake-quant"]
    assert pair["cosine"] >= 0.999 and pair["top1_agreement"] == 1.0, pair


def test_ibert_mode_keeps_the_table_for_both(pooled):
    m, _ = _exported(pooled, "ibert")
    ops = collections.Counter(n.op for n in m.graph.nodes)
    assert ops["ITAGelu"] == 0 and ops["LutInterp16"] == 2, ops


def test_fake_quant_constants_are_the_float_ones_to_half_a_step(pooled):
    root, model = pooled
    m, _ = _exported(pooled, "ita")
    assert m.metadata["attention_blocks"] and m.metadata["feedforward_blocks"]
    g = canonicalize(load(model), {k: list(v) for k, v in m.metadata["source_model"]["input_shapes"].items()})
    tensors = m.graph.tensors
    consts = {n: t.data for n, t in tensors.items() if t.is_const}
    # Without the head sums, which replace the output projection by per-head products of slices
    # of these same constants (tests/test_fakequant_ita_blocks.py), every recorded node stays.
    record = dict(m.metadata["fake_quant"], head_sums=[])
    fg = fake_quant_graph(g, record, consts, {n: t.scale for n, t in tensors.items() if t.is_const})
    nodes, fq_nodes = {n.name: n for n in g.nodes}, {n.name: n for n in fg.nodes}
    joined = per_column = 0
    for node, index, spec, scale in m.metadata["fake_quant"]["consts"]:
        original = g.consts[nodes[node].inputs[index]].astype(np.float64)
        value = fg.consts[fq_nodes[node].inputs[index]].astype(np.float64)
        part = spec["concat"][0] if isinstance(spec, dict) else spec
        step = np.asarray(tensors[part].scale if scale is None else scale, np.float64)
        joined += isinstance(spec, dict)
        per_column += step.size > 1
        # a per-column step runs along the last axis (the output columns)
        assert np.all(np.abs(value - original) <= 0.5 * step * (1 + 1e-6)), (node, index, spec)
    assert joined >= 6 and per_column >= 2  # Wq, Wk, Wv, Wo and the Q/K/V biases; FF2's weight and bias
