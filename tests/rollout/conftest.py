"""Manager-rollout checks on devcluster, run on demand, not in CI:

    uv run --frozen pytest tests/rollout -s

They pass most runs but not every run yet: under a 1 GiB download through the tunnel some
port-forward links to the manager break ("Transport endpoint is not connected"), and one run
in three lost a few connections (issue #10 stays open for it). They use the e2e fixtures."""

from tests.e2e.conftest import cluster, pytest_collection_modifyitems

__all__ = ["cluster", "pytest_collection_modifyitems"]
