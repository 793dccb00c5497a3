#!/usr/bin/env bash
# One entry point for a fresh machine: `./dev.sh demo` runs the engine's demo, `./dev.sh test` runs the tests.
# Both create .venv and install the project with its extras first; re-running is cheap (a stamp file keyed on
# pyproject.toml skips a reinstall when nothing changed).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.sa-engine-installed"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== installing the project into $VENV (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned, so nothing else can pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    # Reference implementations for the parity tests (tests/sam_reference_shim stands in for torchvision):
    # no dependencies (they name torchvision) and no CUDA extension build.
    SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation \
      "sam2==1.1.0" "segment-anything-hq==0.3"
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
  export RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-0}
}

# The browser tests (tests/test_browser.py, tests/test_people_path.py) drive Label Studio's page with Debian's
# Chromium: installed here when this script may (root with apt-get); elsewhere those tests skip and say why. SA_ENGINE_NO_BROWSER=1: don't.
browser() {
  if command -v chromium >/dev/null 2>&1 || [ "${SA_ENGINE_NO_BROWSER:-0}" = 1 ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium for the browser test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "   (could not install chromium: the browser tests will skip)"
  fi
}

# Label Studio on PostgreSQL (labelstudio.database: postgresql, for teams) uses Debian's PostgreSQL server
# programs: installed here when this script may (root with apt-get); without them that test skips and says why.
postgres() {
  if command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
     || [ "${SA_ENGINE_NO_POSTGRES:-0}" = 1 ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's postgresql (Label Studio's database for teams)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; } \
      || echo "   (could not install postgresql: the PostgreSQL test will skip)"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/sa-engine" demo "$@" ;;
  # Two workers by default (the tests are mostly single-threaded): SA_ENGINE_TEST_WORKERS=0 runs them in one process.
  test)  setup; browser; postgres; exec "$VENV/bin/python" -m pytest -n "${SA_ENGINE_TEST_WORKERS:-2}" --dist worksteal "$@" ;;
  *) echo "usage: ./dev.sh demo [--workdir DIR] | ./dev.sh test [pytest args] | ./dev.sh setup"; exit 2 ;;
esac
