"""refsim.golden: capturing every tensor of a run as golden test vectors, and checking dumps."""
