"""Shared test setup.

The Triton interpreter switch must be set before any Triton or kernel module is imported, so it
lives at the very top of the root conftest (pytest imports this file before any test module).
On a machine with CUDA the kernels are compiled for real instead.
"""
import os

if os.environ.get("SSMKIT_TEST_COMPILED") != "1":
    # SSMKIT_TEST_COMPILED=1 (set on a GPU machine) runs the Triton kernels compiled on CUDA.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("SSMKIT_RUN_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Seed every test; restore torch's thread count, which some entry points under test change.
    torch.manual_seed(0)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Run single-threaded: step-by-step recurrences are thousands of tiny ops where extra
    intra-op threads only add synchronization. Use with `pytest.mark.usefixtures("one_thread")`."""
    torch.set_num_threads(1)
