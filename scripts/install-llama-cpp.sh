#!/usr/bin/env bash
# Build and install llama-cpp-python 0.3.36 (PyPI has no wheel of it: pip compiles llama.cpp) with only the
# parts mamba-moe uses: the GGUF quantizer, the llama.cpp parity tests, `generate`/`chat FILE.gguf` and the
# GGUF evaluation backend. About 5 CPU-minutes instead of 11 (docs/export.md, "Installing llama-cpp-python");
# pip caches the wheel, so a second run takes seconds. The build targets this machine's CPU (GGML_NATIVE).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$here/llama_cpp_minimal.cmake"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python3 -m pip install "llama-cpp-python==0.3.36"
