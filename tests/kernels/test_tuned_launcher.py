"""``TunedLauncher``: after the first eager call for a key, an autotuned kernel launches its tuned config without
``Autotuner.run``; a new key (key argument, dtype, constexpr) goes through the autotuner again, and a traced call
gets ``torch.library.wrap_triton``'s launcher.

Our ops' eager calls run with ``wrap_triton`` disabled (``torch.library.triton_op`` and ``kernels._backend``'s
opaque op do that); the tests do the same.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled

import kernels
from kernels._triton_utils import TunedLauncher


@triton.autotune(configs=[triton.Config({"BLOCK": 4}), triton.Config({"BLOCK": 8})], key=["n"])
@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * SCALE, mask=offsets < n)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """The autotuner's and the kernel's ``run``, recorded instead of launched (the autotuner "picks" BLOCK=8)."""
    seen: dict[str, list] = {"autotuner": [], "kernel": []}

    def autotuner_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen["autotuner"].append((args, kwargs))
        _copy_kernel.best_config = _copy_kernel.configs[1]

    monkeypatch.setattr(_copy_kernel, "run", autotuner_run)
    monkeypatch.setattr(_copy_kernel.fn, "run", lambda *args, **kwargs: seen["kernel"].append((args, kwargs)))
    return seen


def test_the_first_call_of_a_key_tunes_and_later_ones_launch_the_tuned_config(calls: dict[str, list]) -> None:
    launcher = TunedLauncher(_copy_kernel)
    x, y = torch.zeros(10), torch.zeros(10)
    grid = (3,)
    with set_wrap_triton_enabled(False):
        for _ in range(3):
            launcher[grid](x, y, 10, SCALE=2)
        assert len(calls["autotuner"]) == 1 and len(calls["kernel"]) == 2
        args, kwargs = calls["kernel"][-1]
        assert len(args) == 3 and args[0] is x and args[1] is y and args[2] == 10
        assert kwargs == {"grid": grid, "warmup": False, "SCALE": 2, **_copy_kernel.configs[1].all_kwargs()}
        assert kwargs["BLOCK"] == 8
        # Each of these is a key of its own: the key argument, a tensor's dtype, a constexpr.
        launcher[grid](x, y, 11, SCALE=2)
        launcher[grid](x.double(), y.double(), 10, SCALE=2)
        launcher[grid](x, y, 10, SCALE=3)
        assert len(calls["autotuner"]) == 4 and len(calls["kernel"]) == 2
        launcher[grid](x, y, 11, SCALE=2)
        assert len(calls["autotuner"]) == 4 and len(calls["kernel"]) == 3


def test_a_traced_launch_goes_through_wrap_triton(calls: dict[str, list], monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel) or {(1,): "traced launch"})
    with set_wrap_triton_enabled(True):
        launch = TunedLauncher(_copy_kernel)[(1,)]
    assert launch == "traced launch" and wrapped == [_copy_kernel]
    assert not calls["autotuner"] and not calls["kernel"]


@pytest.mark.cuda
def test_repeated_op_calls_run_the_autotuner_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    run = triton.runtime.autotuner.Autotuner.run

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        runs.append(self)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", counted)
    x = torch.randn(2, 64, 40, 48, device="cuda")
    boxes = torch.tensor([[0, 1.0, 2.0, 30.0, 40.0], [1, 3.0, 3.0, 20.0, 12.0]], device="cuda")
    outs = [kernels.roi_align(x, boxes, (7, 7), 0.5, 2, True) for _ in range(4)]
    assert len(runs) == 1
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
