"""C target, CMSIS-NN layout: for a model imported from TFLite, every layer's test-data headers
compile with gcc, and a C program recomputing each layer from `config_data.h` alone, with
CMSIS-NN's requantization (gemmlowp's SaturatingRoundingDoublingHighMul and RoundingDivideByPOT,
written here from their definition), reproduces `output_ref` from `input` exactly."""

import shutil
import subprocess

import numpy as np
import pytest
from refsim.cli import main
from tflite_builders import TfliteBuilder, options

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

C_PROGRAM = r"""
#include <stdio.h>
#include <stdint.h>
#include "conv_0/test_data.h"
#include "fully_connected_2/test_data.h"
#include "add_3/test_data.h"

static int32_t srdhm(int32_t a, int32_t b) {
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    int64_t ab = (int64_t)a * b;
    int64_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
    return (int32_t)((ab + nudge) / (1ll << 31));
}
static int32_t rdbpot(int32_t x, int e) {
    int32_t mask = (int32_t)((1ll << e) - 1), rem = x & mask, threshold = (mask >> 1) + (x < 0);
    return (x >> e) + (rem > threshold);
}
static int32_t requantize(int32_t v, int32_t m, int s) {  /* arm_nn_requantize, double rounding */
    return rdbpot(srdhm(v * (1 << (s > 0 ? s : 0)), m), s > 0 ? 0 : -s);
}
static int32_t clamp(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : v > hi ? hi : v; }

int main(void) {
    long bad = 0, n = 0;
    for (int oy = 0; oy < CONV_0_OUTPUT_H; oy++)
        for (int ox = 0; ox < CONV_0_OUTPUT_W; ox++)
            for (int oc = 0; oc < CONV_0_OUT_CH; oc++) {
                int32_t acc = conv_0_biases[oc];
                for (int ky = 0; ky < CONV_0_FILTER_Y; ky++)
                    for (int kx = 0; kx < CONV_0_FILTER_X; kx++) {
                        int iy = oy * CONV_0_STRIDE_Y - CONV_0_PAD_Y + ky * CONV_0_DILATION_Y;
                        int ix = ox * CONV_0_STRIDE_X - CONV_0_PAD_X + kx * CONV_0_DILATION_X;
                        if (iy < 0 || iy >= CONV_0_INPUT_H || ix < 0 || ix >= CONV_0_INPUT_W) continue;
                        for (int ic = 0; ic < CONV_0_IN_CH; ic++)
                            acc += (conv_0_input[(iy * CONV_0_INPUT_W + ix) * CONV_0_IN_CH + ic] + CONV_0_INPUT_OFFSET) *
                                   conv_0_weights[((oc * CONV_0_FILTER_Y + ky) * CONV_0_FILTER_X + kx) * CONV_0_IN_CH + ic];
                    }
                int32_t v = clamp(requantize(acc, conv_0_output_mult[oc], conv_0_output_shift[oc]) + CONV_0_OUTPUT_OFFSET,
                                  CONV_0_OUT_ACTIVATION_MIN, CONV_0_OUT_ACTIVATION_MAX);
                bad += v != conv_0_output_ref[(oy * CONV_0_OUTPUT_W + ox) * CONV_0_OUT_CH + oc]; n++;
            }
    for (int b = 0; b < FULLY_CONNECTED_2_INPUT_BATCHES; b++)
        for (int oc = 0; oc < FULLY_CONNECTED_2_OUT_CH; oc++) {
            int32_t acc = fully_connected_2_biases[oc];
            for (int k = 0; k < FULLY_CONNECTED_2_ACCUMULATION_DEPTH; k++)
                acc += (fully_connected_2_input[b * FULLY_CONNECTED_2_ACCUMULATION_DEPTH + k] + FULLY_CONNECTED_2_INPUT_OFFSET) *
                       (fully_connected_2_weights[oc * FULLY_CONNECTED_2_ACCUMULATION_DEPTH + k] + FULLY_CONNECTED_2_FILTER_OFFSET);
            int32_t v = clamp(requantize(acc, FULLY_CONNECTED_2_OUTPUT_MULTIPLIER, FULLY_CONNECTED_2_OUTPUT_SHIFT) +
                              FULLY_CONNECTED_2_OUTPUT_OFFSET, FULLY_CONNECTED_2_OUT_ACTIVATION_MIN, FULLY_CONNECTED_2_OUT_ACTIVATION_MAX);
            bad += v != fully_connected_2_output_ref[b * FULLY_CONNECTED_2_OUT_CH + oc]; n++;
        }
    for (int i = 0; i < ADD_3_DST_SIZE; i++) {
        int32_t a = (add_3_input1[i] + ADD_3_INPUT1_OFFSET) * (1 << ADD_3_LEFT_SHIFT);
        int32_t b = (add_3_input2[i] + ADD_3_INPUT2_OFFSET) * (1 << ADD_3_LEFT_SHIFT);
        int32_t sum = requantize(a, ADD_3_INPUT1_MULT, ADD_3_INPUT1_SHIFT) + requantize(b, ADD_3_INPUT2_MULT, ADD_3_INPUT2_SHIFT);
        int32_t v = clamp(requantize(sum, ADD_3_OUTPUT_MULT, ADD_3_OUTPUT_SHIFT) + ADD_3_OUTPUT_OFFSET,
                          ADD_3_OUT_ACTIVATION_MIN, ADD_3_OUT_ACTIVATION_MAX);
        bad += v != add_3_output_ref[i]; n++;
    }
    printf("%ld %ld\n", bad, n);
    return 0;
}
"""


def model(rng):
    """CONV_2D (per-channel, SAME, RELU) -> RESHAPE -> FULLY_CONNECTED -> ADD of the FC output with itself."""
    b = TfliteBuilder()
    x = b.input([1, 6, 5, 3], "int8", scale=0.04, zero_point=-5)
    ws = rng.uniform(0.003, 0.02, 4).astype(np.float32)
    w = b.const(rng.integers(-127, 128, (4, 3, 3, 3)), "int8", scale=ws, zero_point=[0] * 4)
    bias = b.const(rng.integers(-900, 900, 4), "int32", scale=np.float32(0.04) * ws, zero_point=[0] * 4)
    c = b.tensor([1, 6, 5, 4], "int8", scale=0.05, zero_point=-128)
    b.op("CONV_2D", [x, w, bias], [c], options("Conv2D", padding=0, strideW=1, strideH=1, fusedActivationFunction=1))
    flat = b.tensor([30, 4], "int8", scale=0.05, zero_point=-128)
    b.op("RESHAPE", [c, b.const(np.array([30, 4]), "int32")], [flat], options("Reshape", newShape=[30, 4]))
    fw = b.const(rng.integers(-127, 128, (6, 4)), "int8", scale=0.01, zero_point=0)
    fb = b.const(rng.integers(-300, 300, 6), "int32", scale=np.float32(0.05) * np.float32(0.01), zero_point=0)
    f = b.tensor([30, 6], "int8", scale=0.02, zero_point=3)
    b.op("FULLY_CONNECTED", [flat, fw, fb], [f], options("FullyConnected"))
    s = b.tensor([30, 6], "int8", scale=0.035, zero_point=-2)
    b.op("ADD", [f, f], [s], options("Add"))
    b.output(s)
    return b.build()


def test_cmsis_nn_headers_compile_and_reproduce_every_layer(tmp_path, capsys):
    rng = np.random.default_rng(11)
    (tmp_path / "m.tflite").write_bytes(model(rng))
    samples = rng.integers(-128, 128, (3, 90))
    samples[0] = -128
    (tmp_path / "inputs.txt").write_text("\n".join(" ".join(map(str, s)) for s in samples) + "\n")
    assert main(["import", str(tmp_path / "m.tflite"), "-o", str(tmp_path / "m.intq")]) == 0
    assert main(["golden", str(tmp_path / "m.intq"), str(tmp_path / "inputs.txt"), "-o", str(tmp_path / "v"), "--targets", "c"]) == 0
    capsys.readouterr()
    for sample in range(3):
        root = tmp_path / "v" / f"sample{sample:04d}" / "cmsis_nn"
        assert sorted(p.name for p in root.iterdir()) == ["add_3", "conv_0", "fully_connected_2"]
        assert sorted(p.name for p in (root / "conv_0").iterdir()) == [
            "biases_data.h", "config_data.h", "input_data.h", "output_mult_data.h", "output_ref_data.h", "output_shift_data.h",
            "test_data.h", "weights_data.h"]
        src = tmp_path / f"check{sample}.c"
        src.write_text(C_PROGRAM)
        exe = tmp_path / f"check{sample}"
        subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(root), "-o", str(exe), str(src)],
                       check=True, capture_output=True, text=True)
        bad, total = map(int, subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split())
        assert total == 6 * 5 * 4 + 30 * 6 + 30 * 6 and bad == 0, (sample, bad, total)
