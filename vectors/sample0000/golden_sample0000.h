/* refsim 0.1.0 golden vectors: model "tiny_mlp", sample 0 ("examples/tiny_mlp_inputs.txt:2").
 * Arrays are row-major (C order). Generated; do not edit. */
#ifndef REFSIM_GOLDEN_SAMPLE0000_H
#define REFSIM_GOLDEN_SAMPLE0000_H

#include <stdint.h>

/* "x": int8 [1, 16], from graph input */
#define X_NDIM 2
#define X_DIM0 1
#define X_DIM1 16
#define X_SIZE 16
static const int8_t x[16] = {
    113, 32, 47, 101, 20, 70, 85, -71, -114, -52, -56, 95, 105, -127, -1, 82
};

/* "fc1.acc": int32 [1, 32], from MatMul node "MatMul_1" */
#define FC1_ACC_NDIM 2
#define FC1_ACC_DIM0 1
#define FC1_ACC_DIM1 32
#define FC1_ACC_SIZE 32
static const int32_t fc1_acc[32] = {
    -801, -994, 231, -1647, -13, 1566, -662, -1076, -179, -1921, 1585, -1091, 2113, 1198, 2195, -206,
    -694, 2574, -2163, 13, 376, -761, -322, -1263, -1388, -13, 1051, -269, 1411, 1977, 438, -1522
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
    -29, -33, 6, -33, 0, 39, -15, -22, -6, -47, 52, -40, 46, 44, 56, -5,
    -17, 88, -84, 0, 13, -18, -7, -34, -45, 0, 40, -10, 45, 57, 10, -39
};

/* "relu.out": int8 [1, 32], from Relu node "Relu_3" */
#define RELU_OUT_NDIM 2
#define RELU_OUT_DIM0 1
#define RELU_OUT_DIM1 32
#define RELU_OUT_SIZE 32
static const int8_t relu_out[32] = {
    0, 0, 6, 0, 0, 39, 0, 0, 0, 0, 52, 0, 46, 44, 56, 0,
    0, 88, 0, 0, 13, 0, 0, 0, 0, 0, 40, 0, 45, 57, 10, 0
};

/* "fc2.acc": int32 [1, 4], from MatMul node "MatMul_4" */
#define FC2_ACC_NDIM 2
#define FC2_ACC_DIM0 1
#define FC2_ACC_DIM1 4
#define FC2_ACC_SIZE 4
static const int32_t fc2_acc[4] = {
    102, -119, -147, -13
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
    72, -84, -104, -9
};

/* "label": int64 [1], from ArgMax node "ArgMax_8" */
#define LABEL_NDIM 1
#define LABEL_DIM0 1
#define LABEL_SIZE 1
static const int64_t label[1] = {
    0LL
};

#endif /* REFSIM_GOLDEN_SAMPLE0000_H */
