"""refsim.hw_vectors: one module per hardware target layout of golden tensors."""
