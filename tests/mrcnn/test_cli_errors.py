"""A user's mistakes at the four command lines (train, evaluate, predict, export): a missing or unreadable file,
an image PIL cannot decode, an unknown option value. Each is one ``error:`` line naming the file or argument,
exit status 1 (the command's own check) or 2 (argparse's usage error), no traceback, and no output folder left
half-made. The entry points run in-process (``cli(argv)``), on a tiny one-step checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mrcnn import evaluate, export, predict, train
from mrcnn.cli import output_folder
from mrcnn.data import ShapesDataset, write_coco

TINY = [
    "--backend", "torch", "--image-size", "64", "--train-size", "8", "--batch-size", "2", "--workers", "0",
    "--no-progress", "--set", "fpn_channels=32", "--set", "representation_size=64",
    "--set", "rpn_pre_nms_top_n_train=100", "--set", "rpn_post_nms_top_n_train=50",
    "--set", "rpn_pre_nms_top_n_test=100", "--set", "rpn_post_nms_top_n_test=50",
    "--set", "box_batch_size_per_image=32", "--set", "detections_per_img=5",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    torch.set_num_threads(1)
    train.main([*TINY, "--iters", "1", "--no-eval", "--out", str(out)])
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good image, a text file named .png, a PNG cut short after its header, an unreadable checkpoint."""
    folder = tmp_path_factory.mktemp("files")
    good = folder / "good.png"
    Image.fromarray(ShapesDataset("val", 1, image_size=64).generate(0)[0]).save(good)
    text = folder / "notes.png"
    text.write_text("not an image\n")
    truncated = folder / "cut.png"
    truncated.write_bytes(good.read_bytes()[:120])
    bad_ckpt = folder / "bad.pt"
    bad_ckpt.write_text("not a checkpoint\n")
    return {"good": good, "text": text, "truncated": truncated, "bad_ckpt": bad_ckpt}


def _fails(cli: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str], status: int,
           *named: str) -> str:  # fmt: skip
    """Run ``cli(argv)``; check the exit status and that stderr ends in one ``error:`` line naming ``named``,
    with no traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    for text in named:
        assert text in lines[-1], (text, err)
    return lines[-1]


# ---------------------------------------------------------------------------------------------- train


def test_train_missing_files_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    missing = str(tmp_path / "missing.pt")
    _fails(train.cli, [*TINY, "--init", missing, "--out", str(out)], capsys, 2, "--init", missing)
    _fails(train.cli, ["--data", "coco", "--ann", missing, "--images", str(tmp_path), "--out", str(out)], capsys, 2,
           "--ann", missing)  # fmt: skip
    _fails(train.cli, ["--val-images", str(tmp_path / "nowhere"), "--out", str(out)], capsys, 2, "--val-images")
    assert not out.exists()


def test_train_unreadable_checkpoints(tmp_path: Path, files: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "run"
    bad = str(files["bad_ckpt"])
    _fails(train.cli, [*TINY, "--init", bad, "--out", str(out)], capsys, 1, "cannot read checkpoint", bad)
    _fails(train.cli, [*TINY, "--resume", "--out", str(out)], capsys, 1, "checkpoint not found",
           str(out / "checkpoint.pt"))  # fmt: skip
    assert not out.exists()  # the run folder is made only once everything is loaded


def test_train_unknown_option_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _fails(train.cli, [*TINY, "--device", "gpu0", "--out", str(out)], capsys, 2, "--device", "gpu0")
    _fails(train.cli, [*TINY, "--amp", "fp8", "--out", str(out)], capsys, 2, "--amp", "fp8")
    assert not out.exists()


def test_train_undecodable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A training image that PIL cannot decode stops the run at its first batch with one line naming it."""
    write_coco(ShapesDataset("train", 2, image_size=64), tmp_path / "train.json", tmp_path / "images")
    broken = sorted((tmp_path / "images").glob("*.png"))
    for path in broken:
        path.write_text("not an image\n")
    argv = [*TINY, "--data", "coco", "--ann", str(tmp_path / "train.json"), "--images", str(tmp_path / "images"),
            "--no-eval", "--iters", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    for workers in ("0", "1"):  # in this process, and in a DataLoader worker
        line = _fails(train.cli, [*argv, "--workers", workers], capsys, 1, "cannot decode image", str(broken[0].parent))
        assert line.startswith(f"error: {tmp_path / 'train.json'}: image id "), line


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_missing_and_unreadable_checkpoint(tmp_path: Path, files: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    missing = str(tmp_path / "missing.pt")
    _fails(evaluate.cli, ["--checkpoint", missing, "--backend", "torch"], capsys, 2, "--checkpoint", missing)
    bad = str(files["bad_ckpt"])
    _fails(evaluate.cli, ["--checkpoint", bad, "--out", str(tmp_path / "e"), "--backend", "torch"], capsys, 1,
           "cannot read checkpoint", bad)  # fmt: skip
    _fails(evaluate.cli, ["--checkpoint", bad, "--data", "coco", "--val-ann", missing], capsys, 2, "--val-ann")
    _fails(evaluate.cli, ["--checkpoint", bad, "--device", "tpu"], capsys, 2, "--device", "tpu")
    _fails(evaluate.cli, ["--checkpoint", bad, "--batch-size", "0"], capsys, 2, "--batch-size")
    assert not (tmp_path / "e").exists()


def test_evaluate_never_overwrites_the_training_metrics(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Beside the checkpoint under its own names; a second evaluation there needs --force."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(checkpoint.read_bytes())
    (run / "metrics.json").write_text('{"history": []}')
    argv = ["--checkpoint", str(ckpt), "--val-size", "2", "--backend", "torch"]
    metrics = evaluate.main(argv)
    assert (run / "metrics.json").read_text() == '{"history": []}'
    assert json.loads((run / "eval_metrics.json").read_text()) == metrics
    assert json.loads((run / "eval_results.json").read_text()) is not None
    printed = capsys.readouterr().out
    assert "fractions of 1" in printed and "| segm |" in printed and "-1: no ground-truth object" in printed
    _fails(evaluate.cli, argv, capsys, 1, str(run / "eval_metrics.json"), "--force")
    before = (run / "eval_metrics.json").stat().st_mtime_ns
    evaluate.main([*argv, "--force"])
    assert (run / "eval_metrics.json").stat().st_mtime_ns != before


def test_evaluate_undecodable_image(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_coco(ShapesDataset("val", 2, image_size=64), tmp_path / "val.json", tmp_path / "images")
    broken = sorted((tmp_path / "images").glob("*.png"))[1]
    broken.write_text("not an image\n")
    out = tmp_path / "e"
    _fails(evaluate.cli, ["--checkpoint", str(checkpoint), "--data", "coco", "--val-ann", str(tmp_path / "val.json"),
                          "--val-images", str(tmp_path / "images"), "--out", str(out), "--backend", "torch"],
           capsys, 1, "cannot decode image", str(broken))  # fmt: skip
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- predict


def test_predict_bad_inputs_write_nothing(checkpoint: Path, tmp_path: Path, files: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "preds"
    ckpt, good = str(checkpoint), str(files["good"])
    common = ["--out", str(out), "--backend", "torch"]
    missing = str(tmp_path / "x.png")
    _fails(predict.cli, ["--checkpoint", ckpt, good, missing, *common], capsys, 2, "images", missing)
    text = str(files["text"])
    _fails(predict.cli, ["--checkpoint", ckpt, good, text, *common], capsys, 2, "cannot decode image", text)
    _fails(predict.cli, ["--checkpoint", missing, good, *common], capsys, 2, "--checkpoint", missing)
    bad = str(files["bad_ckpt"])
    _fails(predict.cli, ["--checkpoint", bad, good, *common], capsys, 1, "cannot read checkpoint", bad)
    _fails(predict.cli, ["--checkpoint", ckpt, good, *common, "--batch-size", "0"], capsys, 2, "--batch-size")
    _fails(predict.cli, ["--checkpoint", ckpt, good, *common, "--backend", "cuda"], capsys, 2, "--backend", "cuda")
    assert not out.exists()


def test_predict_image_that_fails_to_decode_removes_its_folder(checkpoint: Path, tmp_path: Path,
                                                               files: dict[str, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A PNG cut short passes the header check; it fails when decoded, after the first image's picture was
    written: the folder this command made goes, and a folder that existed keeps what it held."""
    truncated = str(files["truncated"])
    out = tmp_path / "preds"
    argv = ["--checkpoint", str(checkpoint), str(files["good"]), truncated, "--backend", "torch"]
    _fails(predict.cli, [*argv, "--out", str(out)], capsys, 1, "cannot decode image", truncated)
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "earlier.txt").write_text("mine")
    _fails(predict.cli, [*argv, "--out", str(kept)], capsys, 1, "cannot decode image", truncated)
    assert (kept / "earlier.txt").read_text() == "mine"


def test_output_folder_removes_only_what_it_made(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), output_folder(tmp_path / "new" / "deeper") as made:
        (made / "half.png").write_bytes(b"")
        raise RuntimeError
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "deeper").exists()
    with output_folder(tmp_path / "ok") as made:
        (made / "a.json").write_text("{}")
    assert (tmp_path / "ok" / "a.json").exists()


# ---------------------------------------------------------------------------------------------- export


def test_export_bad_use(checkpoint: Path, tmp_path: Path, files: dict[str, Path],
                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "pkg"
    missing = str(tmp_path / "missing.pt")
    _fails(export.cli, ["--checkpoint", missing, "--out", str(out / "m.pt2")], capsys, 2, "--checkpoint", missing)
    bad = str(files["bad_ckpt"])
    _fails(export.cli, ["--checkpoint", bad, "--out", str(out / "m.pt2")], capsys, 1, "cannot read checkpoint", bad)
    _fails(export.cli, ["--checkpoint", str(checkpoint), "--out", str(out / "m.zip")], capsys, 2, "--out", "m.zip")
    _fails(export.cli, ["--checkpoint", str(checkpoint), "--out", str(out / "m.pt2"), "--device", "tpu"], capsys, 2,
           "--device", "tpu")  # fmt: skip
    _fails(export.cli, ["--checkpoint", str(checkpoint), "--out", str(out / "m.pt2"), "--image-size", "60", "64"],
           capsys, 1, "image size", "size_divisible")  # fmt: skip
    assert not out.exists()


def test_errors_from_dataloader_workers_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A worker's error arrives with the worker's traceback in its message: the line printed is its last."""
    from mrcnn.cli import run_cli

    def main(argv: list[str] | None) -> None:
        raise ValueError(
            "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nValueError: cannot decode image a.png: broken'
        )

    line = _fails(lambda argv: run_cli(main, argv), [], capsys, 1)
    assert line == "error: cannot decode image a.png: broken"
