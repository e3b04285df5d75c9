"""`refsim warmup MODEL.intq ...`: compile the kernels these models run, ahead of their first run."""

from __future__ import annotations

import time


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help=".intq model files")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic input dimension ('batch', 'seq', ...; default 8 each)")


def _dims(pairs: list[str]) -> dict[str, int]:
    from refsim.errors import InputError

    dims = {}
    for pair in pairs:
        name, _, size = pair.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise InputError(f"--dim {pair!r}: expected NAME=SIZE with a positive SIZE")
        dims[name] = int(size)
    return dims


def main(args) -> int:
    import refsim
    from refsim import jit, warm

    dims = _dims(args.dim)
    for path in args.models:
        started = time.perf_counter()
        model = refsim.load(path)
        warm.compile_for(model, warm.declared_feeds(model, dims))
        print(f"{path}: kernels ready in {time.perf_counter() - started:.1f} s")
    print(f"kernel cache: {jit.cache_dir()}")
    return 0
