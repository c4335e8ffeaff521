"""Test set-up: every kernel test on CPU runs the Triton kernels through Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``kernels`` (and so ``triton.jit``) is imported; CPU tests of
the torch path force it with ``kernels.use_backend("torch")``. Tests marked ``cuda`` run on a GPU
only and are skipped where there is none.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
