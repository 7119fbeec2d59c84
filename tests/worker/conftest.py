# The harness lives in worker_harness.py (a unique module name: tests/master has
# its own conftest); importing it here makes its fixtures visible to pytest.
from worker_harness import backend, bind, run_worker, tcp_backend  # noqa: F401
