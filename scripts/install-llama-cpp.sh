#!/usr/bin/env bash
# Build and install llama-cpp-python 0.3.36 (PyPI has no wheel of it: pip compiles llama.cpp) with only the
# parts mamba-moe uses: the GGUF quantizer, the llama.cpp parity tests, `generate`/`chat FILE.gguf` and the
# GGUF evaluation backend. About 5 CPU-minutes instead of 11 (docs/export.md, "Installing llama-cpp-python").
#
# The build is portable x86-64-v3 (GGML_NATIVE=OFF: AVX2, FMA, F16C, BMI2), not tuned to the build machine:
# a -march=native build on a Xeon with AMX routes Q4_0/Q4_1/Q8_0/K-quant matmuls through ggml's AMX path,
# which crashed llama_decode with a segfault on these machines (2026-12-03, docs/export.md), and a native
# wheel reused from a cache on a different CPU can hit instructions that CPU lacks.
#
# The wheel is kept in a cache of our own, keyed by the version and the build flags: pip's wheel cache is
# keyed by the download URL alone, so it would hand back a wheel built with other CMAKE_ARGS. A second run
# with the same flags installs in seconds; the wheel is built in a temporary folder and moved into place,
# so an interrupted build leaves nothing half-written behind.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="0.3.36"
# The caller's CMAKE_ARGS come last, so they win (CMAKE_ARGS=-DGGML_NATIVE=ON for a build tuned to this CPU).
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$here/llama_cpp_minimal.cmake ${CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# The key leaves out the checkout's path (it is in CMAKE_ARGS) and takes the included file's content instead.
key="$( { echo "$version"; echo "${CMAKE_ARGS//$here/}"; cat "$here/llama_cpp_minimal.cmake"; } | sha256sum | cut -c1-16)"
store="${XDG_CACHE_HOME:-$HOME/.cache}/mamba-moe/llama-cpp-python"
wheels="$store/$key"
if ! compgen -G "$wheels/llama_cpp_python-$version-*.whl" > /dev/null; then
    mkdir -p "$store"
    building="$(mktemp -d "$store/building.XXXXXX")"
    trap 'rm -rf "$building"' EXIT
    python3 -m pip wheel --no-deps --no-cache-dir -w "$building" "llama-cpp-python==$version"
    rm -rf "$wheels" && mv "$building" "$wheels"
fi
# --force-reinstall: pip keeps an installed 0.3.36 of another build (a native one) as "already satisfied".
python3 -m pip install --force-reinstall --no-deps "$wheels"/llama_cpp_python-"$version"-*.whl
python3 -m pip install "$wheels"/llama_cpp_python-"$version"-*.whl   # its dependencies
