"""One module per CLI subcommand (see refsim.cli)."""
