"""The training job end to end on tiny shapes: outputs, resume equality, atomic checkpoints, non-finite
losses, DDP over two gloo processes, the evaluate CLI and COCO-format data.

Everything runs the ops' torch path (``--backend torch``; the kernels are tested under the interpreter in
tests/kernels) on 64 px images with a handful of proposals, so that a training step takes a fraction of a
second. One thread: on a shared 2-core machine OpenMP's spinning threads make two slower than one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrcnn import MaskRCNN, engine, load_model, train
from mrcnn.checkpoint import CheckpointError, atomic_save, load_checkpoint
from mrcnn.cli import Process
from mrcnn.data import ShapesDataset, write_coco

ROOT = Path(__file__).resolve().parents[2]

# Tiny model and data: 64 px shapes, few proposals and RoIs, narrow FPN.
TINY = [
    "--backend", "torch", "--image-size", "64", "--train-size", "64", "--val-size", "4", "--batch-size", "2",
    "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-iters", "2",
    "--set", "fpn_channels=32", "--set", "representation_size=64",
    "--set", "rpn_pre_nms_top_n_train=100", "--set", "rpn_post_nms_top_n_train=50",
    "--set", "rpn_pre_nms_top_n_test=100", "--set", "rpn_post_nms_top_n_test=50",
    "--set", "rpn_batch_size_per_image=64", "--set", "box_batch_size_per_image=32",
    "--set", "box_candidates_per_img=50", "--set", "detections_per_img=10",
    # Every candidate is a detection, so that predict has masks to draw even from an untrained model.
    "--set", "box_score_thresh=0.0",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, *extra: str) -> dict:
    return train.main([*TINY, "--out", str(out), *extra])


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m mrcnn.train *args`` in a subprocess, on one thread (OMP_WAIT_POLICY set: no CPU re-exec)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mrcnn.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[list[float]]:
    return [[r[k] for k in ("loss", *engine.LOSS_NAMES)] for r in _log(out) if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """4 steps with an evaluation at step 2 and at the end, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("full")
    torch.set_num_threads(1)
    _train(out, "--iters", "4", "--eval-every", "2", "--checkpoint-every", "2")
    return out


def test_outputs(full_run: Path) -> None:
    log = _log(full_run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert {"epoch", "lr", "loss", "grad_norm", "images_per_s", "time", "skipped", *engine.LOSS_NAMES} <= set(r)
        assert math.isfinite(r["loss"]) and not r["skipped"]
        assert r["loss"] == pytest.approx(sum(r[k] for k in engine.LOSS_NAMES))
    # Warm-up: the learning rate rises over the first two steps.
    assert log[0]["lr"] < log[1]["lr"]
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 4] and metrics["step"] == 4
    for iou_type in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics[iou_type])
        assert all(-1 <= v <= 1 for v in metrics[iou_type].values())
    ckpt = load_checkpoint(full_run / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["sampler"] == {"epoch": 0, "batch": 4, "seed": 0}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "classes", "label_to_cat"} <= set(ckpt)
    assert not list(full_run.glob(".*.tmp*")), "temporary files left behind"
    # Loadable by our loader with the config it carries (a 64 px model reloads at 64 px, not at torchvision's 800).
    model, _ = load_model(full_run / "checkpoint.pt")
    assert model.config.fpn_channels == 32 and model.config.num_classes == 5 and model.config.min_size == 64
    assert not model.training


def test_resume_is_bit_exact(full_run: Path, tmp_path: Path) -> None:
    """4 steps in one go == 2 steps, stop, resume to 4: same losses and weights, bit for bit."""
    _train(tmp_path, "--iters", "4", "--stop-at", "2", "--eval-every", "2", "--checkpoint-every", "2")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert [h["step"] for h in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [2]
    _train(tmp_path, "--iters", "4", "--eval-every", "2", "--checkpoint-every", "2", "--resume")
    assert _losses(tmp_path) == _losses(full_run)
    a, b = load_checkpoint(full_run / "checkpoint.pt"), load_checkpoint(tmp_path / "checkpoint.pt")
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    ma, mb = json.loads((full_run / "metrics.json").read_text()), json.loads((tmp_path / "metrics.json").read_text())
    assert ma["history"] == mb["history"]


def test_resume_from_a_checkpoint_with_float_learning_rates(full_run: Path, tmp_path: Path) -> None:
    """An optimizer state with float learning rates and without the fused kernels (as older versions wrote it)
    resumes with this version's settings: tensor learning rates the step reads, fused kernels."""
    shutil.copytree(full_run, tmp_path, dirs_exist_ok=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"], group["initial_lr"], group["fused"] = float(group["lr"]), float(group["initial_lr"]), None
    ckpt["scheduler"]["base_lrs"] = [float(b) for b in ckpt["scheduler"]["base_lrs"]]
    atomic_save(ckpt, tmp_path / "checkpoint.pt")
    _train(tmp_path, "--iters", "5", "--no-eval", "--resume")
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == 5 and math.isfinite(_log(tmp_path)[-1]["loss"])
    for group in after["optimizer"]["param_groups"]:
        assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float32 and group["fused"]


class _Crash(Exception):
    pass


def test_checkpoint_write_is_atomic(full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while the checkpoint is written leaves the previous one intact and loadable."""
    shutil.copytree(full_run, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the temporary file is fully written ...
        with open(f, "r+b") as fh:  # ... then torn, and the process "dies"
            fh.truncate(100)
        raise _Crash("simulated crash while writing the checkpoint")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(_Crash, match="simulated crash"):
        _train(tmp_path, "--iters", "6", "--no-eval", "--checkpoint-every", "2", "--resume")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 4
    assert not list(tmp_path.glob(".*.tmp*")), "temporary file left behind"
    # atomic_save itself: the same on any exception.
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(_Crash):
        atomic_save({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == before


def _nan_at(at: int):
    """MaskRCNN.forward, except that training forward number ``at`` (1-based) returns a NaN mask loss."""
    forward, calls = MaskRCNN.forward, [0]

    def patched(model, *args, **kwargs):
        out = forward(model, *args, **kwargs)
        if model.training:
            calls[0] += 1
            if calls[0] == at:
                out = {**out, "loss_mask": out["loss_mask"] * float("nan")}
        return out

    return patched


def test_nonfinite_loss_stops_naming_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MaskRCNN, "forward", _nan_at(3))
    with pytest.raises(engine.NonFiniteError, match=r"non-finite loss at step 3 \(.*loss_mask=nan"):
        _train(tmp_path, "--iters", "4", "--no-eval", "--checkpoint-every", "2")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]


def test_skip_nonfinite_continues_with_finite_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MaskRCNN, "forward", _nan_at(2))
    _train(tmp_path, "--iters", "3", "--no-eval", "--skip-nonfinite")
    log = _log(tmp_path)
    assert [r["skipped"] for r in log] == [False, True, False]
    assert math.isfinite(log[2]["loss"])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for s in ckpt["optimizer"]["state"].values() for v in s.values())


def test_bad_ground_truth_stops_before_the_forward_naming_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN box in the data is reported as such (step, image id, field), not as a non-finite loss."""
    getitem = ShapesDataset.__getitem__

    def nan_box(dataset, index):
        image, target = getitem(dataset, index)
        return image, {**target, "boxes": torch.full_like(target["boxes"], float("nan"))}

    monkeypatch.setattr(ShapesDataset, "__getitem__", nan_box)
    match = r"step 1, batch of image_id \[\d+, \d+\]: targets\[\d\]\['boxes'\]\[0\] = .* is not finite"
    with pytest.raises(engine.BadTargetError, match=match):
        _train(tmp_path, "--iters", "1", "--no-eval")


def test_cli_reports_bad_ground_truth_in_one_line(tmp_path: Path) -> None:
    """Labels the config cannot hold (``--set num_classes=2`` for the shapes' four classes) reach collate: the
    CLI prints one ``error:`` line naming the step, the images and the field, and exits with status 1."""
    proc = _run_cli(*TINY, "--out", str(tmp_path), "--iters", "1", "--no-eval", "--set", "num_classes=2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    match = r"error: step 1, batch of image_id \[\d+, \d+\]: targets\[\d\]\['labels'\]\[\d+\] = \d is outside \[1, 2\)"
    assert re.fullmatch(match + r" \(.*\)", proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp(tmp_path: Path, amp: str) -> None:
    _train(tmp_path, "--iters", "2", "--no-eval", "--amp", amp)
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path))
    scaler = load_checkpoint(tmp_path / "checkpoint.pt")["scaler"]
    assert bool(scaler) == (amp == "fp16")  # fp16 trains with a GradScaler, whose state is saved


def test_compile_flag(tmp_path: Path) -> None:
    """--compile traces the training forward with fullgraph=True (the eager backend keeps CI fast; the
    default inductor backend takes minutes to compile on a small CPU)."""
    torch._dynamo.reset()
    _train(tmp_path, "--iters", "2", "--no-eval", "--compile", "--compile-backend", "eager")
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path))


def test_bad_options_are_rejected(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--lr", "inf"], ["--lr", "nan"], ["--iters", "0"], ["--set", "no_such_field=1"], ["--data", "coco"],
                 ["--image-size", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            train.parse_args(argv)
    assert "--lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--set", "fpn_channels=wide"], r"--set: fpn_channels=wide: MaskRCNNConfig.fpn_channels must be an integer"),
        (["--set", "min_size=0"], r"--set: min_size=0: MaskRCNNConfig.min_size must be >= 1"),
        (["--set", "box_nms_thresh=1.5"], r"--set: box_nms_thresh=1.5: .*box_nms_thresh must be in \[0, 1\]"),
        (["--set", "anchor_sizes=(32, 64)"], r"--set: anchor_sizes=\(32, 64\): .*anchor_sizes must be a tuple of 5"),
        (["--set", "head=v3"], r"--set: head=v3: MaskRCNNConfig.head must be 'v1' or 'v2'"),
        (["--backbone", "vgg16"], r"--backbone: vgg16: MaskRCNNConfig.backbone must be a torchvision ResNet"),
    ],
)
def test_config_options_are_checked_against_the_field(argv: list[str], match: str, capsys) -> None:
    """A --set / --backbone value of the wrong type or range is a usage error naming the argument and the
    field, not a failure deep inside torch."""
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert re.search(match, capsys.readouterr().err)
    assert dict([train._config_override("anchor_sizes=[8, 16, 32, 64, 128]")])["anchor_sizes"] == (8, 16, 32, 64, 128)


def test_prepare_resolves_the_run_without_changing_the_options(full_run: Path) -> None:
    """prepare: the output folder of --resume, the COCO learning rate (0.02 per 16 images), the checkpoint's
    config; args stay as parsed (the checkpoint's "args" record the resolved values instead)."""
    args = train.parse_args([*TINY, "--resume", str(full_run / "checkpoint.pt"), "--no-eval"])
    args.lr = None  # as the COCO preset leaves it
    parsed = dict(vars(args))
    with Process(None) as process:
        setup = train.prepare(args, process, MaskRCNN)
    assert vars(args) == parsed
    assert setup.out == full_run and setup.lr == pytest.approx(0.02 * 2 / 16) and setup.val_dataset is None
    assert setup.config == load_model(full_run / "checkpoint.pt")[0].config and setup.checkpoint["step"] == 4
    saved = load_checkpoint(full_run / "checkpoint.pt")["args"]
    assert saved["out"] == str(full_run) and saved["lr"] == 1e-3


def test_bad_checkpoints_name_the_file(tmp_path: Path) -> None:
    """Empty, truncated, non-dict and foreign checkpoints: an error naming the file, from every loader."""
    torch.save({"model": {"w": torch.zeros(100)}, "step": 1}, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name in ("empty.pt", "truncated.pt", "tensor.pt"):
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / name))):
            load_checkpoint(tmp_path / name)
    # A dict without Mask R-CNN weights: not loadable as a model, nor as --init weights.
    foreign = tmp_path / "whole.pt"
    for load in (load_model, train.load_init_state):
        with pytest.raises(CheckpointError, match=re.escape(f"{foreign} holds no Mask R-CNN weights")):
            load(foreign)


def test_resume_from_a_foreign_checkpoint_names_the_file(tmp_path: Path) -> None:
    """A torchvision state dict given to --resume (it belongs to --init), and the CLI's one-line error."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    foreign = tmp_path / "torchvision.pth"
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict(), foreign)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(foreign))} is not a training checkpoint.*use --init"):
        _train(tmp_path / "out", "--resume", str(foreign))
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = _run_cli("--resume", str(tmp_path / "empty.pt"), "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot read checkpoint {tmp_path / 'empty.pt'}")


def test_resume_rejects_options_that_conflict_with_the_checkpoint(full_run: Path, tmp_path: Path) -> None:
    """--resume keeps the checkpoint's config: a --set / --backbone that differs from it (or an --init) is an
    error naming the option, not silently ignored. Equal values pass (test_resume_is_bit_exact)."""
    ckpt = str(full_run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"--set fpn_channels=64 \(the checkpoint has 32\)"):
        _train(tmp_path, "--iters", "4", "--resume", ckpt, "--set", "fpn_channels=64")
    with pytest.raises(CheckpointError, match=r"--backbone resnet34 \(the checkpoint has 'resnet18'\)"):
        _train(tmp_path, "--iters", "4", "--resume", ckpt, "--backbone", "resnet34")
    with pytest.raises(CheckpointError, match=r"--init .* with --resume"):
        _train(tmp_path, "--iters", "4", "--resume", ckpt, "--init", ckpt)


def test_resume_drops_a_torn_last_log_line_and_rewrites_the_log_atomically(
    full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(full_run, tmp_path, dirs_exist_ok=True)
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "epoch": 0, "lr": 0.0')  # the process died writing step 5's line
    torn = log.read_bytes()
    # A crash while the log is rewritten leaves it as it was, and no temporary file.
    real_write_text = Path.write_text

    def crash(path, text, *args, **kwargs):
        real_write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise _Crash("simulated crash while rewriting the log")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(_Crash):
        _train(tmp_path, "--iters", "4", "--no-eval", "--resume")
    monkeypatch.undo()
    assert log.read_bytes() == torn and not list(tmp_path.glob(".*.tmp*"))
    # The resume itself: nothing left to train at --iters 4; the torn line is gone, the four records stay.
    _train(tmp_path, "--iters", "4", "--no-eval", "--resume")
    assert _log(tmp_path) == _log(full_run)
    # A bad line before the last is not a torn write: an error naming the file and line.
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=re.escape(f"{log}, line 2: not a JSON record")):
        _train(tmp_path, "--iters", "4", "--no-eval", "--resume")


def test_ddp_two_gloo_ranks_match_one_process_accumulating(tmp_path: Path) -> None:
    """2 ranks x batch 1 == 1 process x batch 1 x 2 accumulation steps: same shards, same sampling seeds,
    gradients averaged; losses and weights equal up to float rounding, and both ranks end identical."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    # SGD: its update is linear in the gradient, so the all-reduce's rounding stays rounding. Adam's first
    # steps are ~lr * sign(g), which turns a rounding difference in a near-zero gradient into a full step.
    common = [*TINY, "--batch-size", "1", "--iters", "2", "--no-eval", "--optimizer", "sgd", "--lr", "0.02",
              "--warmup-iters", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mrcnn.train",
           *common, "--out", str(ddp_out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train.main([*common, "--accum-steps", "2", "--out", str(single_out)])

    sync = [r for r in _log(ddp_out) if r.get("event") == "ddp_replicas"]
    assert len(sync) == 1 and sync[0]["in_sync"] and len(set(sync[0]["digests"])) == 1
    for a, b in zip(_losses(ddp_out), _losses(single_out), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # The weights' updates (from the same initial weights) agree up to rounding: DDP averages (g0 + g1) / 2
    # in its all-reduce, accumulation sums g0 / 2 + g1 / 2.
    config = load_model(single_out / "checkpoint.pt")[0].config
    torch.manual_seed(0)
    init = MaskRCNN(config).state_dict()
    a, b = load_checkpoint(ddp_out / "checkpoint.pt")["model"], load_checkpoint(single_out / "checkpoint.pt")["model"]
    moved = 0
    for name, p in MaskRCNN(config).named_parameters():
        if p.requires_grad:
            delta_a, delta_b = a[name] - init[name], b[name] - init[name]
            # Absolute error: rounding of near-zero gradients (relative to the tensor's largest update) plus
            # the float32 spacing of the weights themselves (the deltas are differences of weights).
            ulp = torch.finfo(torch.float32).eps * float(a[name].abs().max())
            atol = 1e-4 * float(delta_a.abs().max()) + 2 * ulp
            torch.testing.assert_close(delta_a, delta_b, rtol=1e-3, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
            moved += int(delta_a.abs().max() > 1e-5)
    assert moved > 50  # the two steps did move the weights



_CYCLE_HOLDING_DDP = """
import os
import sys
import torch
from torch.nn.parallel import DistributedDataParallel
from mrcnn.cli import Process

with Process("cpu"):
    ddp = DistributedDataParallel(torch.nn.Linear(3, 1))
    ddp(torch.ones(2, 3)).sum().backward()
    cycle = [ddp]
    cycle.append(cycle)  # reachable only through the cycle once the names go
    del ddp, cycle
tasks = "/proc/self/task"
with open(os.path.join(sys.argv[1], os.environ["RANK"]), "w") as f:
    f.write(" ".join(sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))))
"""


def test_leaving_the_process_group_joins_its_threads_even_when_a_cycle_holds_it(tmp_path: Path) -> None:
    """A reference cycle holding DDP (hence the gloo group) is collected when ``Process`` exits: no gloo thread
    is left for the interpreter's shutdown, where one aborted the run now and then (SIGABRT, "terminate called
    without an active exception")."""
    script = tmp_path / "cycle.py"
    script.write_text(_CYCLE_HOLDING_DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = {rank: (tmp_path / rank).read_text() for rank in ("0", "1")}  # each rank's thread names
    assert not any("gloo" in names for names in threads.values()), threads


def test_evaluate_cli(full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mrcnn import evaluate

    metrics = evaluate.main(["--checkpoint", str(full_run / "checkpoint.pt"), "--val-size", "3", "--out",
                             str(tmp_path), "--backend", "torch"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| segm |" in printed and "| bbox |" in printed
    written = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert written == metrics and set(written) == {"bbox", "segm"}
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 1, 2}


def test_train_on_coco_files_and_init(full_run: Path, tmp_path: Path) -> None:
    """--data coco on COCO files exported from shapes, starting from our checkpoint (--init)."""
    for split, n in (("train", 8), ("val", 2)):
        write_coco(ShapesDataset(split, n, image_size=64), tmp_path / f"{split}.json", tmp_path / split)
    out = tmp_path / "run"
    result = train.main([
        *TINY, "--data", "coco", "--ann", str(tmp_path / "train.json"), "--images", str(tmp_path / "train"),
        "--val-ann", str(tmp_path / "val.json"), "--val-images", str(tmp_path / "val"), "--iters", "1",
        "--init", str(full_run / "checkpoint.pt"), "--set", "min_size=64", "--set", "max_size=64",
        "--out", str(out),
    ])  # fmt: skip
    assert set(result["metrics"]) == {"step", "bbox", "segm"}
    config = load_model(out / "checkpoint.pt")[0].config
    # Architecture (and trainable BatchNorm) from --init's weights; 3 trainable stages as torchvision fine-tunes.
    assert not config.frozen_batchnorm and config.trainable_backbone_layers == 3 and config.fpn_channels == 32


def test_init_from_a_torchvision_resnet(tmp_path: Path) -> None:
    """--init with an ImageNet-style ResNet state dict: the backbone body gets it, with torchvision's
    fine-tuning set-up (frozen BatchNorm, 3 trainable stages)."""
    from torchvision.models import resnet18

    state = resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    args = train.parse_args([*TINY, "--init", str(tmp_path / "r18.pth")])
    config = train.build_config(args, 5, state)
    assert config.frozen_batchnorm and config.trainable_backbone_layers == 3 and config.backbone == "resnet18"
    model = MaskRCNN(config)
    train._load_init(model, state)
    body = model.backbone.body.state_dict()
    for name in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_var"):
        assert torch.equal(body[name], state[name]), name
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # frozen stage
