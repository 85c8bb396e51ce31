#!/usr/bin/env bash
# What a user gets from `pip install lalora`, not what the editable checkout shows:
#   1. build the sdist, then the wheel from that sdist (python -m build, isolated: only the declared
#      build requirements), so the sdist is proven to hold everything the wheel needs;
#   2. install the wheel WITH its declared runtime dependencies into a fresh virtual environment
#      (no --system-site-packages, no checkout on the path), so a missing declaration fails here;
#   3. from a temp folder outside the checkout: `lalora --help`, `lalora backends`, and
#      scripts/wheel_smoke.py (archive contents vs the checkout, every module imports, entry points,
#      a tiny fit -> save -> load -> regularizer round trip for diag and kfac).
# Usage: bash scripts/wheel_check.sh   (after `bash scripts/dev.sh install`; .ci/run calls it after the tests)
# torch: a CPU-only build is installed first when pip's find-links offer one (what the README tells CPU users
# to do; saves a ~5 GB CUDA download), else pip picks torch from the wheel's requirement like a user's would.
# Set LALORA_WHEEL_TORCH to a pip requirement or wheel path to choose it yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${LALORA_VENV:-.venv}/bin/python"   # the dev environment: runs the build frontend only
[ -x "$PY" ] || bash scripts/dev.sh install
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lalora-wheel.XXXXXX")
# the fresh venv is ~1 GB in ~17k files: unlinking them takes ~1 min on a slow disk, so it runs detached
trap 'nohup rm -rf "$WORK" >/dev/null 2>&1 &' EXIT
quiet() { grep -v "is ignored: it is neither" || true; }   # pip's notes on this machine's local indexes
t0=$SECONDS; t=$t0
lap() { echo "wheel check: $1 ($((SECONDS - t)) s)"; t=$SECONDS; }

"$PY" -c "import build" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check "build>=1" 2>&1 | quiet
if ! "$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1; then
  quiet <"$WORK/build.log"; echo "wheel check: FAILED: python -m build (sdist, then the wheel from it)" >&2; exit 1
fi
SDIST=$(ls "$WORK"/dist/lalora-*.tar.gz); WHEEL=$(ls "$WORK"/dist/lalora-*.whl)
lap "built $(basename "$SDIST") and, from it, $(basename "$WHEEL")"

python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
TORCH=${LALORA_WHEEL_TORCH:-}
if [ -z "$TORCH" ]; then
  tag=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  links="${PIP_FIND_LINKS:-} $("$VPY" -m pip config get global.find-links 2>/dev/null || true)"
  for d in $links; do
    d=${d#file://}
    [ -d "$d" ] && for w in "$d"/torch-*+cpu-"$tag"-"$tag"-*linux*_x86_64.whl; do [ -e "$w" ] && TORCH=$w; done
  done
fi
# --no-compile: no .pyc for the ~20k files of torch & co. up front (the smoke compiles what it imports)
"$VPY" -m pip install -q --disable-pip-version-check --no-compile ${TORCH:+"$TORCH"} "$WHEEL" 2>&1 | quiet
"$VPY" -m pip check --disable-pip-version-check >/dev/null || "$VPY" -m pip check   # conflicting requirements
lap "installed ${TORCH:+$(basename "$TORCH") and }the wheel with its declared dependencies into a fresh venv: $("$VPY" \
  -m pip list 2>/dev/null | awk 'tolower($1) ~ /^(torch|peft|transformers|safetensors)$/ {printf "%s %s  ", $1, $2}')"

mkdir "$WORK/run"
cp scripts/wheel_smoke.py "$WORK/run/"
(
  cd "$WORK/run"
  "$WORK/venv/bin/lalora" --help >/dev/null
  "$WORK/venv/bin/lalora" backends >/dev/null
  # -I: neither the script's folder nor PYTHON* variables nor the user site reach sys.path
  "$VPY" -I wheel_smoke.py --checkout "$ROOT" --wheel "$WHEEL" --sdist "$SDIST"
)
lap "lalora --help, lalora backends and the smoke test ran from $WORK/run"
echo "wheel check: passed in $((SECONDS - t0)) s"
