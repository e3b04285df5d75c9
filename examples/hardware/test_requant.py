"""cocotb test: drive requant.v with every Requant node of a refsim vector set.

The set comes from `refsim golden` (folder in $REFSIM_VECTORS); refsim.golden.open gives,
per node, its attributes and constant inputs (mul, shift, bias, offset) and, per sample,
the accumulator it read and the int8 tensor it wrote. The design must reproduce every value.
"""

import os

import cocotb
import numpy as np
import refsim.golden
from cocotb.triggers import Timer


def channel(param, index, axis, shape):
    """The entry of a scalar or per-channel parameter that element `index` uses."""
    if param is None:
        return 0
    param = np.asarray(param).reshape(-1)
    if param.size == 1:
        return int(param[0])
    return int(param[np.unravel_index(index, shape)[axis]])


@cocotb.test()
async def requant_matches_refsim(dut):
    vs = refsim.golden.open(os.environ["REFSIM_VECTORS"])
    checked = 0
    for node in vs.nodes("Requant"):
        assert node.attrs.get("rounding", "half_up") == "half_up" and node.attrs.get("dtype", "int8") == "int8", node
        mul, shift = node.const("mul"), node.const("shift")
        bias = node.const("bias") if node.has("bias") else None
        offset = node.const("offset") if node.has("offset") else None
        lo, hi = node.attrs.get("lo", -128), node.attrs.get("hi", 127)
        for sample in vs.samples:
            acc, expected = sample[node.input_names[0]], sample[node.output]
            axis = node.attrs.get("axis", -1) % acc.ndim
            for i, (a, want) in enumerate(zip(acc.reshape(-1).tolist(), expected.reshape(-1).tolist())):
                dut.acc.value = a
                dut.mul.value = channel(mul, i, axis, acc.shape)
                dut.bias.value = channel(bias, i, axis, acc.shape)
                dut.shift.value = channel(shift, i, axis, acc.shape)
                dut.offset.value = channel(offset, i, axis, acc.shape)
                dut.lo.value, dut.hi.value = lo, hi
                await Timer(1, unit="ns")
                got = dut.out.value.to_signed()
                assert got == want, f"{node.name} sample {sample.index} element {i}: expected {want}, got {got}"
                checked += 1
    assert checked > 0, "the vector set has no Requant node"
    dut._log.info("%d requantized values match refsim", checked)
