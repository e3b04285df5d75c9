/* refsim 0.1.0 golden vectors: model "tiny_mlp", sample 2 ("examples/tiny_mlp_inputs.txt:4").
 * Arrays are row-major (C order). Generated; do not edit. */
#ifndef REFSIM_GOLDEN_SAMPLE0002_H
#define REFSIM_GOLDEN_SAMPLE0002_H

#include <stdint.h>

/* "x": int8 [1, 16], from graph input */
#define X_NDIM 2
#define X_DIM0 1
#define X_DIM1 16
#define X_SIZE 16
static const int8_t x[16] = {
    2, 126, 78, 74, 51, 31, -41, 125, -9, -73, 88, -87, 91, 28, -99, -117
};

/* "fc1.acc": int32 [1, 32], from MatMul node "MatMul_1" */
#define FC1_ACC_NDIM 2
#define FC1_ACC_DIM0 1
#define FC1_ACC_DIM1 32
#define FC1_ACC_SIZE 32
static const int32_t fc1_acc[32] = {
    -510, 2345, -1832, 1236, -3520, 1641, -2085, 206, -603, -3729, -164, -88, 1467, -1494, -2112, 1859,
    1353, 1705, -2759, -536, -987, -38, -758, -549, 1936, 945, 1594, -656, -1444, -2570, 1351, -1562
};

/* "fc1.out": int8 [1, 32], from Requant node "Requant_2" */
#define FC1_OUT_NDIM 2
#define FC1_OUT_DIM0 1
#define FC1_OUT_DIM1 32
#define FC1_OUT_SIZE 32
#define FC1_OUT_RQ_SHIFT 12
#define FC1_OUT_RQ_AXIS -1
#define FC1_OUT_RQ_LO -128
#define FC1_OUT_RQ_HI 127
#define FC1_OUT_RQ_ROUNDING "half_up"
/* Requant_2: per-channel mul */
static const int32_t fc1_out_rq_mul[32] = {
    146, 136, 107, 82, 149, 101, 92, 84, 131, 100, 134, 152, 89, 151, 104, 97,
    103, 140, 159, 121, 145, 95, 86, 111, 132, 113, 157, 146, 132, 118, 94, 104
};
static const int8_t fc1_out[32] = {
    -18, 78, -48, 25, -128, 40, -47, 4, -19, -91, -5, -3, 32, -55, -54, 44,
    34, 58, -107, -16, -35, -1, -16, -15, 62, 26, 61, -23, -47, -74, 31, -40
};

/* "relu.out": int8 [1, 32], from Relu node "Relu_3" */
#define RELU_OUT_NDIM 2
#define RELU_OUT_DIM0 1
#define RELU_OUT_DIM1 32
#define RELU_OUT_SIZE 32
static const int8_t relu_out[32] = {
    0, 78, 0, 25, 0, 40, 0, 4, 0, 0, 0, 0, 32, 0, 0, 44,
    34, 58, 0, 0, 0, 0, 0, 0, 62, 26, 61, 0, 0, 0, 31, 0
};

/* "fc2.acc": int32 [1, 4], from MatMul node "MatMul_4" */
#define FC2_ACC_NDIM 2
#define FC2_ACC_DIM0 1
#define FC2_ACC_DIM1 4
#define FC2_ACC_SIZE 4
static const int32_t fc2_acc[4] = {
    104, 43, -37, 140
};

/* "logits": int8 [1, 4], from Requant node "Requant_7" */
#define LOGITS_NDIM 2
#define LOGITS_DIM0 1
#define LOGITS_DIM1 4
#define LOGITS_SIZE 4
#define LOGITS_RQ_MUL 181
#define LOGITS_RQ_SHIFT 8
#define LOGITS_RQ_AXIS -1
#define LOGITS_RQ_LO -128
#define LOGITS_RQ_HI 127
#define LOGITS_RQ_ROUNDING "half_up"
static const int8_t logits[4] = {
    74, 30, -26, 99
};

/* "label": int64 [1], from ArgMax node "ArgMax_8" */
#define LABEL_NDIM 1
#define LABEL_DIM0 1
#define LABEL_SIZE 1
static const int64_t label[1] = {
    3LL
};

#endif /* REFSIM_GOLDEN_SAMPLE0002_H */
