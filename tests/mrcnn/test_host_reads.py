"""A training step reads no tensor value back to Python in the main process, except on a step that logs.

Counted over a short ``mrcnn.train`` run: every way Python reads a tensor's value (``Tensor.item``, ``tolist``,
``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``numpy``) is wrapped, and a ``TorchDispatchMode``
watches the aten ops that read a value or whose output shape is the data's (``nonzero``, ``masked_select``,
``unique``, boolean indexing, ...). On a GPU each of these is a stall of the host, and none can be captured
in a CUDA graph. The ops run their Triton kernels (through the interpreter on CPU), the path CUDA tensors take;
the DataLoader worker checks and pads the batches in its own process.
"""

from __future__ import annotations

import collections
import itertools
import json
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mrcnn import engine, train

# One image per step at 64 px, few anchors, proposals and RoIs: ~3 s a step under the interpreter.
SMALL = [
    "--backend", "triton", "--image-size", "64", "--train-size", "16", "--batch-size", "1", "--workers", "1",
    "--no-progress", "--no-eval", "--lr", "1e-3", "--warmup-iters", "2", "--checkpoint-every", "100",
    "--set", "fpn_channels=16", "--set", "representation_size=16",
    "--set", "rpn_pre_nms_top_n_train=32", "--set", "rpn_post_nms_top_n_train=16",
    "--set", "rpn_batch_size_per_image=16", "--set", "box_batch_size_per_image=8",
]  # fmt: skip

READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
# aten ops that read a value on the host or give an output whose shape depends on the data.
DATA_DEPENDENT_OPS = {
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave", "bincount", "equal", "is_nonzero", "allclose",
}  # fmt: skip


class HostReads(TorchDispatchMode):
    """Counts host reads (with where they happened) while active and while the methods are patched."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: collections.Counter[str] = collections.Counter()

    def note(self, what: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "/mrcnn/" in f.filename or "/kernels/" in f.filename]
        self.where[f"{what} at {frames[-1].filename}:{frames[-1].lineno}" if frames else what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name == "index" and len(args) > 1 else ()
        if name in DATA_DEPENDENT_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.note(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReads]:
    reads = HostReads()
    for name in READ_METHODS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):  # noqa: ANN001, ANN002, ANN003
            reads.note(f"Tensor.{_name}")
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with reads:
        yield reads


def test_steps_read_nothing_back_except_to_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               host_reads: HostReads) -> None:  # fmt: skip
    """6 steps, a log read every 3: steps 2, 4 and 5 read nothing (step 1 may: the first launches), steps 3
    and 6 read their rows once (a ``tolist``), and the log holds what was read."""
    counts_at_step: list[tuple[int, collections.Counter[str]]] = []
    train_step = engine.Trainer.train_step

    def counted_step(trainer: engine.Trainer, batches: Iterator) -> None:
        counts_at_step.append((host_reads.count, host_reads.where.copy()))
        train_step(trainer, batches)

    monkeypatch.setattr(engine.Trainer, "train_step", counted_step)
    torch.set_num_threads(1)
    train.main([*SMALL, "--iters", "6", "--log-every", "3", "--out", str(tmp_path)])
    counts_at_step.append((host_reads.count, host_reads.where.copy()))
    per_step = {
        step: (n1 - n0, w1 - w0)
        for step, ((n0, w0), (n1, w1)) in enumerate(itertools.pairwise(counts_at_step), start=1)
    }
    for step in (2, 4, 5):
        assert per_step[step][0] == 0, f"step {step} read {dict(per_step[step][1])}"
    for step in (3, 6):  # the rows of the steps since the last read, in one tolist (step 6: and the checkpoint's)
        assert sum(n for what, n in per_step[step][1].items() if "step.py" in what) == 1, per_step[step][1]
    log = [line for line in (tmp_path / "log.jsonl").read_text().splitlines() if line]
    assert [json.loads(line)["step"] for line in log] == [3, 6]
