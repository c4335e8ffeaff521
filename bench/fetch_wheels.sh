#!/usr/bin/env bash
# Prepares .whl/ (git-ignored) with the wheels bench/gpu.sh installs on the lent GPU machine, which has no
# network. Run here, with network, before the device call that carries .whl:
#     bash bench/fetch_wheels.sh
#
# Only what that machine lacks: its image (Python 3.12, torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26.0,
# numpy 2.5, pytest, pytest-benchmark, pytest-timeout, hypothesis, matplotlib, pillow, tqdm; the package list
# of the device's KINDS.md) has every dependency of ours but pycocotools. Wheels are fetched with the device
# README's recipe: --no-deps (pip would otherwise fetch numpy & co., which would replace the machine's own),
# binaries only, for CPython 3.12 on manylinux x86-64. Each wheel's Requires-Dist is then checked against
# MACHINE_HAS and the fetched set, so a new dependency is reported instead of failing on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pycocotools==2.0.11)
# Distributions the GPU image holds (lower case, '-' for '_'), from /work/.library/device/KINDS.md, 2026-11-17.
MACHINE_HAS=" numpy matplotlib pillow torch triton torchvision pytest pytest-benchmark pytest-timeout hypothesis
  tqdm contourpy cycler fonttools kiwisolver packaging pyparsing python-dateutil six "

PY="${PYTHON:-python3}"
rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${WHEELS[@]}"

fetched=" "
for whl in .whl/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]_' '[:lower:]-')
  fetched+="$name "
done
missing=()
for whl in .whl/*.whl; do
  # Requires-Dist lines without an extra marker: "Requires-Dist: numpy>=1.23; python_version ..." -> numpy
  while read -r req; do
    [[ -z "$req" ]] && continue
    name=$(echo "$req" | sed -E 's/^([A-Za-z0-9_.-]+).*/\1/' | tr '[:upper:]_.' '[:lower:]--')
    echo "fetch_wheels: $(basename "$whl") requires $req"
    if [[ "$MACHINE_HAS" != *" $name "* && "$fetched" != *" $name "* ]]; then
      missing+=("$name")
    fi
  done < <("$PY" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print(line.split(":", 1)[1].strip())
EOF
)
done
if ((${#missing[@]})); then
  echo "fetch_wheels: needed but neither on the GPU machine nor fetched: ${missing[*]} (add them to WHEELS)" >&2
  exit 1
fi
du -ch .whl/*.whl | tail -1 | sed 's/^/fetch_wheels: .whl\/ holds /'
ls .whl
