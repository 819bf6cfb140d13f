"""Fixtures of the Credo client tests: the end-to-end fixtures (real ``twistd mpr`` processes)
and the installed Node side (clients/credo, prepared by scripts/install-credo)."""

from tests.credo.node import credo_client  # noqa: F401  (fixture)
from tests.e2e.conftest import mpr, mpr_servers  # noqa: F401  (fixtures)
