"""Test-suite wide rules. The quick subset is `pytest -m "not slow"`; `slow` marks every test that
takes more than about 5 s, either by itself (`@pytest.mark.slow`) or because it needs a complete
Snakemake run of a workflow (the fixtures below), which takes a minute or more on two CPU cores."""
from __future__ import annotations

import os

import pytest

# Triton kernels run through Triton's interpreter on a CPU-only test run (tests/engine/test_gather_dot.py);
# Triton reads this once, when first imported. Product code uses a kernel on the CPU only inside
# `gather_dot.interpreted()`.
if os.environ.get("DROPINF_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: Fixtures that run a whole workflow: a test using one of them is slow whatever its own body does.
WORKFLOW_RUNS = ("default_run", "austen_run", "sharded_run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in WORKFLOW_RUNS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def train_digits_mlp():
    """Prepare digits (20% flipped labels) and fine-tune a small tanh MLP on the CPU into folder `d`
    (`data.pt`, `model.pt`, `model.json`): the stage tests' common starting point."""
    def make(d, *, max_train: int = 300, max_test: int = 100, hidden=(16,), epochs: int = 3):
        from dropinf.pipeline.prepare import prepare_data
        from dropinf.pipeline.train import finetune

        prepare_data(out=d / "data.pt", dataset="digits", label_noise=0.2, noise_seed=0, threads=1,
                     dataset_options={"max_train": max_train, "max_test": max_test})
        finetune(data=d / "data.pt", out=d / "model.pt", metrics_out=d / "model.json", model="mlp",
                 model_options={"hidden": list(hidden)}, settings={"epochs": epochs}, device="cpu", threads=1)
        return d

    return make


@pytest.fixture
def extract_job():
    """The `ExtractJob` that `python -m dropinf extract` builds from the given extra arguments."""
    from dropinf.__main__ import parser

    p = parser()

    def parse(*more):
        args = p.parse_args(["extract", "--data", "d.pt", "--model", "m.pt", "--out-dir", "o", "--compressor",
                             "dropout", *more])
        return args._command.options_from(vars(args)).job
    return parse
