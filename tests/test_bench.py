"""The benchmark tooling: the runner (``python -m bench``), the report builder (``python -m bench.report``)
and the pure parts of ``bench.kernels`` (occupancy, launch selection) against hand-computed values.

The runner test is a ``--quick`` CPU run of one real suite plus a tiny copy benchmark written here (outside
``bench/``, so without its conftest: all four cases run), so that it checks the JSON and the smoke table
whatever the real suites report; the chart is checked on stored results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench.__main__ as runner
from bench.kernels import (
    SM80,
    SM90,
    _decode,
    _encode,
    below_floor,
    code_of,
    committed_hash,
    global_memory_ops,
    memory_label,
    occupancy,
    select,
    sources_hash,
)
from bench.report import chart_figure, markdown
from bench.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

COPY_SUITE = """
import pytest
import torch


@pytest.mark.parametrize("provider", ["ours", "torchvision"])
@pytest.mark.parametrize("n", [4096, 8192])
def test_copy(benchmark, provider, n):
    x, y = torch.ones(n), torch.empty(n)
    step = (lambda: y.copy_(x)) if provider == "ours" else (lambda: y.copy_(x.clone()))
    benchmark.extra_info.update(op="copy", shape=[n], dtype="float32", mode="forward", provider=provider, bytes=8 * n)
    benchmark(step)
"""


def _suite_file(bench: dict) -> str:
    """The file name of a benchmark's suite. ``fullname`` is relative to the rootdir pytest chose, which is
    not the checkout when that lies inside the system's temporary directory (like the copy suite)."""
    return Path(bench["fullname"].split("::")[0]).name


@pytest.mark.slow
def test_runner_quick_writes_json_and_smoke_table(tmp_path: Path) -> None:
    suite = tmp_path / "test_copy.py"
    suite.write_text(COPY_SUITE)
    real = sorted((ROOT / "bench").glob("test_*.py"))[:1]  # one real suite, to keep this under a minute
    only = ",".join(f.stem.removeprefix("test_") for f in real) or "none"
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", only, "--suite", str(suite), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    assert results["device_type"] == "cpu" and results["quick"] is True
    assert results["copy_bandwidth_gbps"] > 0 and results["matmul_tflops"] > 0 and results["matmul_dtype"] == "float32"
    assert set(results["versions"]) >= {"torch", "triton", "torchvision"}
    assert "commit" in results["git"]
    assert all("exit 0," in status for status in results["suites"].values()), results["suites"]
    copies = [b for b in results["benchmarks"] if _suite_file(b) == "test_copy.py"]
    assert len(copies) == 4
    assert all({"p20", "p80", "median"} <= set(b["stats"]) and "data" not in b["stats"] for b in copies)
    for f in real:  # the real suite ran; bench/conftest.py's --quick kept one case per test and provider
        cases = [(b["fullname"].split("[")[0], (b["params"] or {}).get("provider")) for b in results["benchmarks"]
                 if _suite_file(b) == f.name]  # fmt: skip
        assert cases and len(cases) == len(set(cases)), cases

    assert all(b["stats"]["rounds"] >= 3 for b in copies)  # a median of three calls, not one
    table = result_file.with_suffix(".md").read_text()
    assert table.startswith("# Smoke run:") and "**Smoke figures, not a benchmark**" in table
    assert "| op | shape | dtype | mode | ours | torchvision |\n" in table  # no speedup or bandwidth column
    assert "| copy | 4096 | float32 | forward |" in table and "| speedup" not in table
    assert not result_file.with_suffix(".png").exists()  # no speedup chart of smoke figures
    assert "no chart for a smoke run" in proc.stdout


def test_runner_without_pytest_benchmark_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """After the README's main install (no bench extra): one line naming the extra, status 2, nothing written."""
    find_spec = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec",
                        lambda name, *args: None if name == "pytest_benchmark" else find_spec(name, *args))  # fmt: skip
    out = tmp_path / "results"
    assert runner.main(["--quick", "--out-dir", str(out)]) == runner.EXIT_CANNOT_RUN
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "pytest-benchmark" in captured.err and 'pip install -e ".[bench]"' in captured.err
    assert not out.exists()


def test_quick_run_leaves_out_the_export_suite() -> None:
    names = lambda files: [f.stem.removeprefix("test_") for f in files]  # noqa: E731
    everything, none_left_out = runner.suites()
    assert "export" in names(everything) and none_left_out == []
    quick, left_out = runner.suites(quick=True)
    assert left_out == ["export"] and names(quick) == [n for n in names(everything) if n != "export"]
    assert runner.suites(["export"], quick=True) == ([ROOT / "bench" / "test_export.py"], [])  # asked for: it runs
    assert runner.suites(skip=["export"], quick=True)[1] == []


def test_report_from_stored_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "nvidia-h100-2025-01-02.json"
    shutil.copy(DATA / "bench_results.json", results)
    assert report_main([str(results)]) == 0
    table = (tmp_path / "nvidia-h100-2025-01-02.md").read_text()
    assert table == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    lines = table.splitlines()
    assert "| op | shape | dtype | mode | ours | torchvision | time | speedup | % of bandwidth |" in lines
    # speedup 200/50 = 4; bandwidth share 1e8 B / 50 us / 3000 GB/s = 67 %
    assert (
        "| roi_align | 1024x256x7x7 | float16 | forward | 50 us (49-51) | 200 us (190-210) | - | 4.00x | 67% |" in lines
    )
    # no extra_info: fields from the pytest params, q1/q3 when there are no percentiles, no bytes
    assert "| mask_loss | - | - | forward | 1 ms (0.9-1.1) | 3 ms (2.9-3.1) | - | 3.00x | - |" in lines
    # no torchvision row: no speedup
    assert "| nms | 4000 boxes | float32 | forward | 2.5 s (2.4-2.6) | - | - | - | - |" in lines
    # neither extra_info nor known params: the test name tells the case, in a plain time column
    assert "| paste_masks test_paste[big] | - | - | - | - | - | 20 ms | - | - |" in lines
    assert "Suites that did not pass: test_nms.py: exit 1" in table
    assert (tmp_path / "nvidia-h100-2025-01-02.png").read_bytes().startswith(PNG_MAGIC)


def test_smoke_results_make_no_speedup_table() -> None:
    results = json.loads((DATA / "bench_results.json").read_text())
    table = markdown({**results, "quick": True})
    assert "Smoke figures, not a benchmark" in table and "| speedup" not in table and "% of bandwidth" not in table
    assert "| roi_align | 1024x256x7x7 | float16 | forward | 50 us (49-51) | 200 us (190-210) | - |" in table
    assert chart_figure({**results, "quick": True}) is None


def test_chart_text_never_collides() -> None:
    """Speedups from 0.0028x to 141x with long case names: no two pieces of text on the chart overlap (case names,
    values, axis ticks and labels, title), and all lie inside the figure."""
    results = json.loads((DATA / "bench_results.json").read_text())
    bench = results["benchmarks"][0]
    cases = [("nms", "2x1000->2000", 0.0028), ("paste_masks_in_image", "100x28x28->800x1333", 141.0),
             ("roi_align", "2x256x200x336", 0.9), ("decode_boxes", "2000x91", 1.02),
             ("mask_loss", "256x80x28x28", 8.0)]  # fmt: skip
    results["benchmarks"] = [
        {**bench, "extra_info": {**bench["extra_info"], "op": op, "shape": shape, "provider": provider},
         "stats": {"median": 1e-3 * (ratio if provider == "torchvision" else 1.0)}}
        for op, shape, ratio in cases for provider in ("ours", "torchvision")
    ]  # fmt: skip
    fig = chart_figure(results)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    def drawn(axis):  # the tick labels drawn: the axis shown, the tick inside the view, the label on
        lo, hi = sorted(axis.get_view_interval())
        ticks = axis.get_major_ticks() if axis.get_visible() else []
        return [
            t for tick in ticks if lo <= tick.get_loc() <= hi for t in (tick.label1, tick.label2) if t.get_visible()
        ]

    texts = [t for ax in fig.axes for t in (*drawn(ax.xaxis), *drawn(ax.yaxis), *ax.texts, ax.xaxis.label, ax.title)
             if t.get_visible() and t.get_text()]  # fmt: skip
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert {t.get_text() for t in texts} >= {"0.0028x", "141x", "0.90x", "1.02x", "8.00x"}
    figure_box = fig.bbox
    for i, (text, box) in enumerate(zip(texts, boxes, strict=True)):
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0, text
        for other, other_box in zip(texts[i + 1 :], boxes[i + 1 :], strict=True):
            assert not box.overlaps(other_box), (text.get_text(), other.get_text())
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize(
    ("arch", "regs", "smem", "warps", "blocks"),
    [
        (SM90, 32, 0, 4, 16),  # threads: 2048 / 128
        (SM90, 255, 0, 8, 1),  # 255 regs -> 8192 per warp -> 2 warps per sub-partition -> 8 warps
        (SM90, 64, 0, 4, 8),  # 2048 regs per warp -> 8 warps per sub-partition -> 32 warps
        (SM90, 40, 0, 4, 12),  # 1280 regs per warp -> 12 warps per sub-partition -> 48 warps
        (SM90, 16, 50_000, 4, 4),  # 51,072 B per block with the 1 KB reserve -> 4 in 228 KB
        (SM80, 16, 50_000, 4, 3),  # 164 KB
        (SM90, 16, 0, 1, 32),  # the 32-blocks limit
        (SM90, 16, 240_000, 4, 0),  # over the per-block maximum
        (SM90, 256, 0, 4, 0),  # over 255 registers
    ],
)
def test_occupancy(arch, regs: int, smem: int, warps: int, blocks: int) -> None:
    got, fraction = occupancy(arch, regs, smem, warps)
    assert got == blocks
    assert fraction == pytest.approx(blocks * warps / 64)


def _specimen(dtype: str, block: int, flag: bool) -> dict:
    return {"args": {"x": {"tensor": dtype}, "n": {"int": "i32"}, "BLOCK": {"value": block}, "FLAG": {"value": flag}},
            "options": {}}  # fmt: skip


def test_select_covers_flags_and_largest_blocks_per_dtype() -> None:
    specimens = [_specimen("float32", 16, False), _specimen("float32", 64, False), _specimen("float32", 16, True),
                 _specimen("float16", 32, True)]  # fmt: skip
    picked = select(specimens)
    # fp32: BLOCK=64 (its largest) with FLAG=False, then FLAG=True; fp16: its one launch
    assert picked == [specimens[1], specimens[2], specimens[3]]
    assert select(specimens, first_only=True) == [specimens[1], specimens[3]]


def test_committed_kernel_report_is_fresh() -> None:
    """bench/results/kernels-sm90.md was made from the kernels and suites of this checkout."""
    assert committed_hash() == sources_hash(), (
        "bench/results/kernels-sm90.md is stale (kernels/, the suites or bench.kernels changed): "
        "regenerate it with `python -m bench.kernels` (about 10 minutes on 2 cores) and commit it"
    )


_KERNEL_MODULE = '''"""A kernel module."""
import triton


# 4 warps: measured fastest
@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4)], key=["n"])
@triton.jit
def _kernel(x_ptr, n, BLOCK: tl.constexpr):
    """Doubles x."""
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
'''


def test_report_hash_ignores_prose_and_tracks_code() -> None:
    """A comment, docstring or formatting edit of a kernel module leaves the report fresh (``code_of`` unchanged);
    an edit of a kernel's code or autotune configs stales it."""
    src = _KERNEL_MODULE
    prose = src.replace("Doubles x.", "Doubles x, masked.").replace("# 4 warps", "# four warps").replace(
        "offs < n), mask", "offs < n),  mask"
    )
    assert prose != src and code_of(prose) == code_of(src)
    for code_edit in (src.replace("2 * tl", "3 * tl"), src.replace("num_warps=4", "num_warps=8")):
        assert code_of(code_edit) != code_of(src)


def _row(config: str, launch: str, spills: int, blocks: int, warps: int = 4, source: str = "coco") -> dict:
    return {"arch": "90", "kernel": "kernels.x:_x_fwd_kernel", "dtype": "fp32", "launch": launch, "config": config,
            "source": source, "regs": 64, "spills": spills, "blocks": blocks, "num_warps": warps,
            "occupancy": blocks * warps / 64}  # fmt: skip


def test_below_floor_names_launches_without_a_lean_config() -> None:
    rows = [
        _row("A", "OUT=7", spills=0, blocks=4),  # 16 warps, no spills: OUT=7 is fine
        _row("B", "OUT=7", spills=0, blocks=1),
        _row("A", "OUT=14", spills=0, blocks=3),  # 12 warps
        _row("B", "OUT=14", spills=8, blocks=8),  # 32 warps but spills
        _row("A", "OUT=28", spills=0, blocks=1, source="tests"),  # not a COCO launch: not judged
    ]
    low = below_floor(rows)
    assert [(r["launch"], r["config"], r["warps"]) for r in low] == [("OUT=14", "A", 12)]
    assert below_floor([r for r in rows if r["launch"] == "OUT=7"]) == []


def test_global_memory_ops_reads_widths_and_ordering() -> None:
    """Widths are vector lanes x element bits; shared-memory and non-memory instructions do not count; an atomic
    without an ordering is PTX's default, relaxed."""
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.b32 %r5, [ %rd2 + 0 ];
        @%p2 ld.global.L1::evict_last.v2.b32 { %r6, %r7 }, [ %rd3 + 0 ];
        ld.global.b16 %rs1, [ %rd4 + 0 ];
        ld.shared.v4.b32 { %r8, %r9, %r10, %r11 }, [ %r12 + 0 ];
        st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
        st.global.b16 [ %rd6 + 0 ], %rs1;
        @%p3 atom.global.gpu.relaxed.add.v4.f32 { %f1, %f2, %f3, %f4 }, [ %rd7 + 0 ], { %f5, %f6, %f7, %f8 };
        atom.global.gpu.acq_rel.add.f32 %f9, [ %rd8 + 0 ], %f10;
        red.global.add.f32 [ %rd9 + 0 ], %f11;
        mov.b32 %r13, %r14;
    """
    ops = global_memory_ops(ptx)
    assert ops == {"ld": {"128": 1, "32": 1, "64": 1, "16": 1}, "st": {"128": 1, "16": 1},
                   "atom": {"128": 1, "32": 2}, "order": {"relaxed": 2, "acq_rel": 1}}  # fmt: skip
    assert memory_label(ops["ld"]) == "128x1 64x1 32x1 16x1" and memory_label({}) == "-"


def test_integers_keep_their_divisibility_by_16() -> None:
    """A recorded integer compiles with a neutral value of its width that Triton specializes as it would the
    real one: divisible by 16 or not (never 1, never the test's own small value)."""
    assert _encode(256, constexpr=False) == {"int": "i32", "div16": True}
    assert _encode(49, constexpr=False) == {"int": "i32"}
    assert _encode(256, constexpr=True) == {"value": 256}
    for value in (0, 16, 256, 17, 49, 2**40 * 16, 2**40 + 3):
        rebuilt = _decode(_encode(value, constexpr=False))
        assert rebuilt != 1 and (rebuilt % 16 == 0) == (value % 16 == 0), value
