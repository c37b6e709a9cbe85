#!/usr/bin/env bash
# Builds llama.cpp's C++ llama-server from the llama.cpp source vendored in the pinned llama-cpp-python
# sdist (the same llama.cpp that flashhead's llama.cpp engine runs), for labs/serve_bench.py's side-by-side
# speed table (docs/benchmarks.md, "Serving"). Opt-in: make test does not need it.
#   labs/build_llama_server.sh [JOBS]     -> prints the binary's path; cached under ~/.cache/flashhead
set -euo pipefail
VERSION=0.3.36   # keep equal to LLAMA_CPP in scripts/setup.sh
JOBS=${1:-$(nproc)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FLASHHEAD_CACHE:-$HOME/.cache/flashhead}/llama-server-$VERSION
BIN=$CACHE/build/bin/llama-server
if [[ -x $BIN ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE"
if [[ ! -d $CACHE/src ]]; then
  [[ -f $CACHE/llama_cpp_python-$VERSION.tar.gz ]] || "$ROOT/.venv/bin/pip" download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$CACHE" >&2
  tmp=$(mktemp -d "$CACHE/src.XXXX")
  tar xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$CACHE/src" && rm -rf "$tmp"
fi
start=$(date +%s)
cmake -S "$CACHE/src" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$CACHE/build" --target llama-server -j "$JOBS" >&2
echo "built llama-server in $(( $(date +%s) - start )) s with $JOBS jobs" >&2
echo "$BIN"
