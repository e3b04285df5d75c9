/* refsim 0.1.0 golden vectors: model "tiny_mlp", sample 3 ("examples/tiny_mlp_inputs.txt:5").
 * Arrays are row-major (C order). Generated; do not edit. */
#ifndef REFSIM_GOLDEN_SAMPLE0003_H
#define REFSIM_GOLDEN_SAMPLE0003_H

#include <stdint.h>

/* "x": int8 [1, 16], from graph input */
#define X_NDIM 2
#define X_DIM0 1
#define X_DIM1 16
#define X_SIZE 16
static const int8_t x[16] = {
    -15, -119, -92, 3, 120, -9, 78, 106, 82, 33, -16, 3, -60, -1, -31, -65
};

/* "fc1.acc": int32 [1, 32], from MatMul node "MatMul_1" */
#define FC1_ACC_NDIM 2
#define FC1_ACC_DIM0 1
#define FC1_ACC_DIM1 32
#define FC1_ACC_SIZE 32
static const int32_t fc1_acc[32] = {
    -1396, -405, 395, 351, 1450, -1997, 1594, 622, 1287, -770, 216, 1538, 1232, -444, 65, -1470,
    571, -1041, -657, 650, 154, -1008, 49, 225, 196, 92, 1802, 889, 1054, -28, -65, 2225
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
    -50, -13, 10, 7, 53, -49, 36, 13, 41, -19, 7, 57, 27, -16, 2, -35,
    14, -36, -26, 19, 5, -23, 1, 6, 6, 3, 69, 32, 34, -1, -1, 56
};

/* "relu.out": int8 [1, 32], from Relu node "Relu_3" */
#define RELU_OUT_NDIM 2
#define RELU_OUT_DIM0 1
#define RELU_OUT_DIM1 32
#define RELU_OUT_SIZE 32
static const int8_t relu_out[32] = {
    0, 0, 10, 7, 53, 0, 36, 13, 41, 0, 7, 57, 27, 0, 2, 0,
    14, 0, 0, 19, 5, 0, 1, 6, 6, 3, 69, 32, 34, 0, 0, 56
};

/* "fc2.acc": int32 [1, 4], from MatMul node "MatMul_4" */
#define FC2_ACC_NDIM 2
#define FC2_ACC_DIM0 1
#define FC2_ACC_DIM1 4
#define FC2_ACC_SIZE 4
static const int32_t fc2_acc[4] = {
    -232, -45, -61, 68
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
    -128, -32, -43, 48
};

/* "label": int64 [1], from ArgMax node "ArgMax_8" */
#define LABEL_NDIM 1
#define LABEL_DIM0 1
#define LABEL_SIZE 1
static const int64_t label[1] = {
    3LL
};

#endif /* REFSIM_GOLDEN_SAMPLE0003_H */
