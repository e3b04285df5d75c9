"""Low-level compute kernels the ops use (not ops themselves): CPU detection, exact GEMM."""
