"""Counting the calls of a function however its callers imported it (``from m import f`` binds ``f`` where a
monkeypatch of ``m.f`` does not reach): a profile hook that matches the function's code object."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


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
