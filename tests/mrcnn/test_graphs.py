"""CUDA graphs of the training step and of inference (``mrcnn.graphs``).

On a CPU: the option's resolution and its one-line messages, and ``Captured``'s life cycle (warm-up, one
capture per input signature, static inputs refreshed before each replay, outputs copied, the eager fallback
when a capture fails) with a stand-in for the CUDA graph. On a GPU (``cuda``): a captured training run against
an eager one, and captured inference against the eager forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mrcnn import MaskRCNN, MaskRCNNConfig, engine, train
from mrcnn.graphs import Captured, copy_into, cuda_graphs_enabled, signature


def test_the_option_is_on_with_cuda_and_says_why_when_it_cannot_be(capsys: pytest.CaptureFixture) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cuda_graphs_enabled("auto", cuda, what="the training step")
    assert cuda_graphs_enabled("on", cuda, what="inference")
    assert not cuda_graphs_enabled("off", cuda, what="the training step")
    assert not cuda_graphs_enabled("auto", cpu, what="the training step")
    assert capsys.readouterr().err == ""  # off, and auto without CUDA, choose silently
    assert not cuda_graphs_enabled("on", cpu, what="the training step")
    assert not cuda_graphs_enabled("auto", cuda, what="the training step", distributed=True)
    assert not cuda_graphs_enabled("on", cuda, what="the training step", static_model=False)
    assert capsys.readouterr().err.splitlines() == [
        "--cuda-graphs: the training step runs eager: cpu is not a CUDA device",
        "--cuda-graphs: the training step runs eager: DistributedDataParallel's gradient all-reduce is not captured",
        "--cuda-graphs: the training step runs eager: the model has no static-shape forward to capture",
    ]


class StandInGraphs:
    """``CudaGraph``'s interface on a CPU: "capturing" records the function over the static inputs, and a
    replay runs it again into the same output tensors, as a graph replays into its static outputs."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.eager_runs, self.captures, self.replays = fail, 0, 0, 0

    def run_eager(self, fn, inputs):  # noqa: ANN001, ANN201
        self.eager_runs += 1
        return fn(inputs)

    def capture(self, fn, static_inputs):  # noqa: ANN001, ANN201
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.captures += 1
        out = fn(static_inputs)

        def replay() -> None:
            self.replays += 1
            copy_into(out, fn(static_inputs))

        return replay, out


def _fn(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs["x"] * 2, inputs["y"].sum(0)


def test_captured_warms_up_captures_once_per_signature_and_refreshes_its_static_inputs() -> None:
    graphs = StandInGraphs()
    reset_calls = []
    run = Captured(_fn, device=torch.device("cpu"), what="f", warmup=2, graphs=graphs,
                   reset=lambda: reset_calls.append(1))  # fmt: skip
    calls = [{"x": torch.full((3,), float(i)), "y": torch.arange(6.0).view(2, 3) + i} for i in range(5)]
    outs = []
    for inputs in calls:  # every call sees its own inputs
        outs.append(run(inputs))
        torch.testing.assert_close(outs[-1][0], inputs["x"] * 2)
        torch.testing.assert_close(outs[-1][1], inputs["y"].sum(0))
    assert (graphs.eager_runs, graphs.captures, graphs.replays, len(reset_calls)) == (2, 1, 3, 1)
    # Replays return the static outputs themselves: the next replay overwrites them.
    assert outs[2][0] is outs[3][0] and outs[3][0] is outs[4][0]
    # The static inputs are the graph's own copies, not the caller's tensors.
    static_inputs = run.entries[signature(calls[0])][0]
    assert static_inputs["x"] is not calls[-1]["x"] and torch.equal(static_inputs["x"], calls[-1]["x"])
    # A new shape is a new signature: warm-up and capture again.
    run({"x": torch.zeros(4), "y": torch.zeros(2, 3)})
    run({"x": torch.zeros(4), "y": torch.zeros(2, 3)})
    run({"x": torch.zeros(4), "y": torch.zeros(2, 3)})
    assert (graphs.eager_runs, graphs.captures, len(run.entries)) == (4, 2, 2)


def test_captured_copies_its_outputs_when_asked() -> None:
    run = Captured(_fn, device=torch.device("cpu"), what="f", warmup=0, graphs=StandInGraphs(), copy_outputs=True)
    first = run({"x": torch.ones(3), "y": torch.ones(2, 3)})
    second = run({"x": torch.zeros(3), "y": torch.zeros(2, 3)})
    assert torch.equal(first[0], torch.full((3,), 2.0)) and torch.equal(second[0], torch.zeros(3))


def test_a_failed_capture_says_why_in_one_line_and_runs_eager(capsys: pytest.CaptureFixture) -> None:
    graphs = StandInGraphs(fail=True)
    reset_calls = []
    run = Captured(_fn, device=torch.device("cpu"), what="the training step", warmup=1, graphs=graphs,
                   reset=lambda: reset_calls.append(1))  # fmt: skip
    outs = [run({"x": torch.full((3,), float(i)), "y": torch.zeros(2, 3)}) for i in range(3)]
    assert [float(a[0]) for a, _ in outs] == [0.0, 2.0, 4.0]
    assert capsys.readouterr().err.splitlines() == [
        "--cuda-graphs: capturing the training step failed (RuntimeError: operation not permitted when stream is "
        "capturing); running eager"
    ]
    assert len(reset_calls) == 2 and run.failed and not run.entries  # reset before the capture and after it failed


def test_training_with_cuda_graphs_on_a_cpu_says_so_and_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.mrcnn.test_train import TINY as TRAIN_TINY

    torch.set_num_threads(1)
    result = train.main([*TRAIN_TINY, "--iters", "1", "--no-eval", "--cuda-graphs", "on", "--out", str(tmp_path)])
    assert "--cuda-graphs: the training step runs eager: cpu is not a CUDA device" in capsys.readouterr().err
    assert result["first_step_s"] > 0  # the cold start, from the process's start (this one: pytest's)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]


# -- on a GPU --------------------------------------------------------------------------------------------------

TINY = [
    "--image-size", "64", "--train-size", "16", "--batch-size", "2", "--no-progress", "--no-eval", "--lr", "1e-3",
    "--warmup-iters", "2", "--log-every", "1", "--workers", "0", "--no-compile",
    "--set", "fpn_channels=32", "--set", "representation_size=64",
    "--set", "rpn_pre_nms_top_n_train=100", "--set", "rpn_post_nms_top_n_train=50",
    "--set", "rpn_batch_size_per_image=64", "--set", "box_batch_size_per_image=32",
]  # fmt: skip


@pytest.mark.cuda
def test_captured_training_follows_the_eager_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 steps, 2 eager warm-up steps then 3 replays of one graph: the losses follow the eager run's (the same
    seeds, the same kernels; float atomics in RoIAlign's backward make neither run bitwise reproducible)."""
    trainers = []
    init = engine.Trainer.__init__

    def keep(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        init(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(engine.Trainer, "__init__", keep)
    argv = [*TINY, "--device", "cuda", "--iters", "5"]
    train.main([*argv, "--cuda-graphs", "off", "--out", str(tmp_path / "eager")])
    train.main([*argv, "--cuda-graphs", "on", "--out", str(tmp_path / "captured")])
    assert trainers[0].graphs is None and len(trainers[1].graphs.entries) == 1 and trainers[1].graphs.failed is None

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]

    eager, captured = losses(tmp_path / "eager"), losses(tmp_path / "captured")
    assert len(eager) == len(captured) == 5
    assert captured == pytest.approx(eager, rel=1e-3)


@pytest.mark.cuda
def test_captured_inference_gives_the_eager_detections() -> None:
    torch.manual_seed(0)
    config = MaskRCNNConfig(num_classes=5, min_size=128, max_size=160, box_score_thresh=0.0)
    model = MaskRCNN(config).cuda().eval()
    images = [torch.rand(3, 120, 150, device="cuda"), torch.rand(3, 100, 160, device="cuda")]
    eager = model.predict(images)
    model.capture_inference()
    captured = [model.predict(images) for _ in range(3)]  # one eager run, the capture, replays
    assert len(model._captured_inference.entries) == 1
    for run in captured:
        for e, c in zip(eager, run, strict=True):
            for key in ("boxes", "scores", "labels", "masks"):
                torch.testing.assert_close(c[key], e[key], rtol=1e-4, atol=1e-4)
