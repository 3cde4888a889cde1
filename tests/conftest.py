"""Test-suite wide rules. The quick subset is `pytest -m "not slow"`; `slow` marks every test that
takes more than about 5 s, either by itself (`@pytest.mark.slow`) or because it needs a complete
Snakemake run of a workflow (the fixtures below), which takes a minute or more on two CPU cores."""
from __future__ import annotations

import pytest

#: Fixtures that run a whole workflow: a test using one of them is slow whatever its own body does.
WORKFLOW_RUNS = ("default_run", "austen_run", "sharded_run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in WORKFLOW_RUNS):
            item.add_marker(pytest.mark.slow)
