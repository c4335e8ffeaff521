#!/usr/bin/env bash
# The lent GPU machine's job in one device call (README, "Benchmarks"): the CUDA tests on compiled kernels,
# the op benchmarks and the model benchmarks at COCO shapes, each stage in its own time budget, every result
# written under $OUT (the folder the device tool brings back).
#
#   bash bench/gpu.sh                    # on the GPU machine: all stages, at most ~8 minutes
#   bash bench/gpu.sh --stages tests     # rerun only what failed (tests, ops, model; comma-separated)
#   bash bench/gpu.sh --dry-run          # here, on CPU: the same stages at the suites' CPU shapes (~2 min)
#
# Set-up. python3 (the machine's Python 3.12 with torch; PYTHON overrides). The wheels carried in .whl/
# (bench/fetch_wheels.sh makes them here: what the machine lacks, pycocotools) go to a --target folder on
# PYTHONPATH, with --no-deps so that nothing of the machine's own is replaced; the repository itself is on
# PYTHONPATH too (no install). TRITON_INTERPRET=0, not unset: tests/conftest.py defaults an unset one to 1.
#
# Stages (seconds: TESTS_S, OPS_S, PROFILE_S, MODEL_S override them; TESTS_K, a pytest -k expression, and
# OPS_ONLY, suites as in python -m bench --only, narrow a rerun to what failed or ran out of time). Each runs under
# `timeout -s INT -k 15`: SIGINT first, so that pytest prints its summary and writes its XML/JSON, SIGKILL 15 s
# later if it hangs.
#   tests (130 s)  pytest -m cuda over tests/, no -x, 90 s per test (pytest-timeout, where installed):
#                  tests.log, tests.xml (JUnit)
#   ops   (150 s)  python -m bench, every suite but the model and export (AOTInductor compiles for minutes;
#                  run it alone: python -m bench --only export): ops.json (rewritten after each suite; a suite
#                  over its share gets SIGINT and keeps its finished rows), ops.log
#   profile (40 s) python -m bench.profile: wall against device time per call of the mask-loss and RoIAlign
#                  cases, with their heaviest kernels (is a slow row the host or the kernel?): profile.log
#   model  (90 s)  python -m bench --only model, eager providers before compiled ones: model.json, model.log
#                  (the compiled providers may not fit: "partial", with the rows that did, is not a failure)
# Then gpu-status.md: the machine, the versions, one line per stage (passed / failed / timed out, seconds).
# 8 files in $OUT, names of letters, digits, '.', '-' (the device brings back at most 8, 2 folders deep).
# Tables and charts are made afterwards, here: python -m bench.report <file>.json.
#
# --dry-run: the CPU (CUDA_VISIBLE_DEVICES=""), the suites' CPU shapes, --quick benchmarks (one case per
# benchmark and provider), the interpreter off; the tests stage then collects every test and skips the CUDA
# ones. $OUT defaults to a new temporary folder. CI runs it on the GPU machine's stack (.ci/run).
# Exit status: 0 if every stage passed (or was partial), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
stages="tests,ops,profile,model"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --stages) stages="${2:?--stages needs a list}"; shift ;;
    --stages=*) stages="${1#*=}" ;;
    *) echo "usage: bash bench/gpu.sh [--dry-run] [--stages tests,ops,profile,model]" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python3}"
if ((dry_run)); then
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-dry-run.XXXXXX")}"
  export CUDA_VISIBLE_DEVICES=""
  site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-site.XXXXXX")"
  quick=(--quick)
  quick_profile=(--steps 1)
else
  OUT="${OUT:-bench/results/gpu-$(date -u +%F)}"
  site="${WHEEL_SITE:-/tmp/site}"
  quick=()
  quick_profile=()
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status_file="$OUT/gpu-status.md"
started=$SECONDS
lines=()
failed=0

note() { echo "gpu.sh: $*"; }

# ---- set-up -------------------------------------------------------------------------------------------
setup="no .whl/ carried"
py_version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if ((dry_run)) && [[ "$py_version" != 3.12 ]]; then
  setup="not installed: the wheels are for the GPU machine's Python 3.12, this is $py_version"
elif compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl; then
    setup="installed $(cd .whl && echo *.whl) into $site"
  else
    setup="FAILED to install .whl/ into $site"
    failed=1
  fi
fi
note "$setup"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
machine=$("$PY" - <<'EOF' 2>&1
import platform, torch, triton
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{dev}; python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}")
EOF
)
note "$machine"

# run_stage NAME SECONDS COMMAND...: the command under SIGINT-then-KILL, its output to NAME.log and stdout.
run_stage() {
  local name=$1 budget=$2 t0=$SECONDS rc result
  shift 2
  if [[ ",$stages," != *",$name,"* ]]; then
    return
  fi
  note "stage $name (budget ${budget} s): $*"
  timeout -s INT -k 15 "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) result="passed" ;;
    3) result="partial: a suite ran out of its time share and kept its finished rows (see $name.log)" ;;
    124 | 137) result="TIMED OUT after ${budget} s (exit $rc)"; failed=1 ;;
    *) result="FAILED (exit $rc)"; failed=1 ;;
  esac
  lines+=("| $name | $result | $((SECONDS - t0)) |")
  note "stage $name: $result in $((SECONDS - t0)) s"
}

# ---- (a) CUDA correctness tests ------------------------------------------------------------------------
per_test=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  per_test=(--timeout=90)
else
  note "pytest-timeout is not installed: no per-test timeout (the stage's timeout still holds)"
fi
select=()
[[ -n "${TESTS_K:-}" ]] && select=(-k "$TESTS_K")
run_stage tests "${TESTS_S:-130}" "$PY" -m pytest tests -m "${GPU_TEST_MARKS:-cuda}" "${select[@]}" -q -rfE \
  -p no:cacheprovider -o addopts=--strict-markers --continue-on-collection-errors "${per_test[@]}" \
  --junitxml="$OUT/tests.xml"

# ---- (b) op benchmarks, (c) profile, (d) model benchmarks ----------------------------------------------
# The runner's own budget ends 30 s before the stage's: imports and baselines, and the SIGINT grace.
ops_s="${OPS_S:-150}"
model_s="${MODEL_S:-$( ((dry_run)) && echo 150 || echo 90)}"  # the CPU's training steps take ~10 s each
run_stage ops "$ops_s" "$PY" -m bench "${quick[@]}" ${OPS_ONLY:+--only "$OPS_ONLY"} --skip model,export --max-time 0.2 \
  --time-budget $((ops_s - 30)) --out-dir "$OUT" --name ops --no-report
run_stage profile "${PROFILE_S:-40}" "$PY" -m bench.profile "${quick_profile[@]}"
run_stage model "$model_s" "$PY" -m bench "${quick[@]}" --only model --time-budget $((model_s - 25)) \
  --out-dir "$OUT" --name model --no-report

# ---- summary ---------------------------------------------------------------------------------------------
{
  echo "# bench/gpu.sh $( ((dry_run)) && echo "--dry-run ")$(date -u +%FT%TZ)"
  echo
  echo "- machine: $machine"
  echo "- commit: $(git rev-parse HEAD 2>/dev/null || echo "unknown (no git)")"
  echo "- wheels: $setup"
  echo "- stages: $stages; whole script $((SECONDS - started)) s"
  echo
  echo "| stage | result | seconds |"
  echo "|---|---|--:|"
  printf '%s\n' "${lines[@]}"
} >"$status_file"

# The device brings back at most 8 files, 2 folders deep, named in letters, digits, '.', '_' and '-'.
files=$(cd "$OUT" && find . -type f | sed 's|^\./||')
count=$(echo "$files" | grep -c .)
bad=$(echo "$files" | grep -Ev '^([A-Za-z0-9._-]+/){0,2}[A-Za-z0-9._-]+$' || true)
if ((count > 8)) || [[ -n "$bad" ]]; then
  echo "- FAILED the device's file rules: $count files; bad names or depth: ${bad:-none}" >>"$status_file"
  failed=1
fi
cat "$status_file"
note "results in $OUT ($count files)"
exit $failed
