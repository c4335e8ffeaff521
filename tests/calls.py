"""Counting calls: of a Python function however its callers imported it (``from m import f`` binds ``f`` where a
monkeypatch of ``m.f`` does not reach), with a profile hook that matches the function's code object; and of the
ops dispatched through torch, with a ``TorchDispatchMode``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode


@contextlib.contextmanager
def counted_calls(fn: Callable[..., object]) -> Iterator[list[None]]:
    """Inside the block, each call of ``fn`` in this thread appends to the yielded list."""
    code, calls = fn.__code__, []
    previous = sys.getprofile()

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 (sys.setprofile's protocol)
        if event == "call" and frame.f_code is code:
            calls.append(None)

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


class CountedOps(TorchDispatchMode):
    """Inside the ``with`` block, ``count`` is the number of dispatched ops for which ``which(op)`` is true. The
    mode sees an op called in Python; what a custom op's implementation calls runs with the mode off."""

    def __init__(self, which: Callable[[OpOverload], bool]) -> None:
        super().__init__()
        self.which, self.count = which, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        self.count += bool(self.which(func))
        return func(*args, **(kwargs or {}))
