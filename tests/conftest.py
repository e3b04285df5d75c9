import os

import pytest
from hypothesis import HealthCheck, settings

# Numba compiles on first use; deadlines would measure compilation, not correctness.
settings.register_profile(
    "refsim",
    deadline=None,
    max_examples=int(os.environ.get("REFSIM_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("refsim")


@pytest.fixture(params=["numba", "numpy"])
def each_backend(request):
    """Run a test once per kernel backend; both must give identical results."""
    from refsim import backend

    with backend.use(request.param):
        yield request.param
