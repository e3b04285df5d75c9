import os

import pytest
from hypothesis import HealthCheck, settings

# Numba compiles on first use; deadlines would measure compilation, not correctness.
settings.register_profile(
    "refsim",
    deadline=None,
    max_examples=int(os.environ.get("REFSIM_HYPOTHESIS_EXAMPLES", "60")),
    # each_backend is function-scoped on purpose: it only selects the backend, which holds
    # for every example of the test.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("refsim")

# Compile kernels in the foreground, as the tests check them: a cold run's spec fallback
# and background compile (refsim.warm) are tested on their own, in tests/test_warm.py.
os.environ.setdefault("REFSIM_COMPILE", "now")


@pytest.fixture(params=["numba", "numpy"])
def each_backend(request):
    """Run a test once per kernel backend; both must give identical results."""
    from refsim import backend

    with backend.use(request.param):
        yield request.param


@pytest.fixture(params=["numba", "numpy", "spec"])
def every_backend(request):
    """As each_backend, and also the spec backend a cold run uses (NumPy's formulas with
    products in exact float chunks, refsim.warm)."""
    from refsim import backend

    with backend.use(request.param):
        yield request.param
