# The harness lives in master_harness.py (a unique module name: tests/worker has
# its own conftest); importing it here makes its fixtures visible to pytest.
from master_harness import (echo_backend, http_backend, master_factory,  # noqa: F401
                            notify_socket)
