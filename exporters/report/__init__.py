"""`refsim report`: one self-contained HTML page on what quantization did to a model."""
