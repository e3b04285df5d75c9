"""The documentation keeps up with the code: every registered op has its formula in
docs/OPS.md, under a `### OpName(` heading."""

import re
from pathlib import Path

from refsim.ops import OPS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_ops() -> set[str]:
    text = (DOCS / "OPS.md").read_text(encoding="utf-8")
    # a heading may document several ops: "### Add(a, b; ...), Sub(a, b; ...)"
    names = set()
    for heading in re.findall(r"^### (.+)$", text, flags=re.MULTILINE):
        names.update(re.findall(r"(?:^|,\s*)([A-Za-z_][A-Za-z0-9_]*)\(", heading))
    return names


def test_every_registered_op_is_documented():
    missing = sorted(set(OPS) - documented_ops())
    assert not missing, f"ops without a '### Name(' heading in docs/OPS.md: {missing}"


def test_every_documented_op_is_registered():
    stale = sorted(documented_ops() - set(OPS))
    assert not stale, f"docs/OPS.md documents ops that are not registered: {stale}"
