/* refsim 0.1.0 golden vectors: model "tiny_mlp", sample 1 ("examples/tiny_mlp_inputs.txt:3").
 * Arrays are row-major (C order). Generated; do not edit. */
#ifndef REFSIM_GOLDEN_SAMPLE0001_H
#define REFSIM_GOLDEN_SAMPLE0001_H

#include <stdint.h>

/* "x": int8 [1, 16], from graph input */
#define X_NDIM 2
#define X_DIM0 1
#define X_DIM1 16
#define X_SIZE 16
static const int8_t x[16] = {
    -95, 76, -98, -9, 81, -51, -41, -57, 56, -63, 125, -15, -6, 1, 21, 13
};

/* "fc1.acc": int32 [1, 32], from MatMul node "MatMul_1" */
#define FC1_ACC_NDIM 2
#define FC1_ACC_DIM0 1
#define FC1_ACC_DIM1 32
#define FC1_ACC_SIZE 32
static const int32_t fc1_acc[32] = {
    -133, 3860, -3241, -570, -346, 406, -696, -144, 128, 565, -1281, 1077, -119, -2752, 382, 581,
    1421, 566, 599, 1548, -1175, -123, -924, -1187, -1309, -542, -263, -473, 1566, -128, 506, 781
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
    -5, 127, -85, -11, -13, 10, -16, -3, 4, 14, -42, 40, -3, -101, 10, 14,
    36, 19, 23, 46, -42, -3, -19, -32, -42, -15, -10, -17, 50, -4, 12, 20
};

/* "relu.out": int8 [1, 32], from Relu node "Relu_3" */
#define RELU_OUT_NDIM 2
#define RELU_OUT_DIM0 1
#define RELU_OUT_DIM1 32
#define RELU_OUT_SIZE 32
static const int8_t relu_out[32] = {
    0, 127, 0, 0, 0, 10, 0, 0, 4, 14, 0, 40, 0, 0, 10, 14,
    36, 19, 23, 46, 0, 0, 0, 0, 0, 0, 0, 0, 50, 0, 12, 20
};

/* "fc2.acc": int32 [1, 4], from MatMul node "MatMul_4" */
#define FC2_ACC_NDIM 2
#define FC2_ACC_DIM0 1
#define FC2_ACC_DIM1 4
#define FC2_ACC_SIZE 4
static const int32_t fc2_acc[4] = {
    -8, 3, 0, 85
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
    -6, 2, 0, 60
};

/* "label": int64 [1], from ArgMax node "ArgMax_8" */
#define LABEL_NDIM 1
#define LABEL_DIM0 1
#define LABEL_SIZE 1
static const int64_t label[1] = {
    3LL
};

#endif /* REFSIM_GOLDEN_SAMPLE0001_H */
