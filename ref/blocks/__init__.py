"""Graph forms of hardware blocks: fixed integer subgraphs that a hardware target runs as one
unit, built from integers and found again by the record they leave in the graph's metadata."""
