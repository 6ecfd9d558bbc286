# Included by CMake right after llama.cpp's project() when llama-cpp-python is built from source:
#   bash scripts/install-llama-cpp.sh (which passes -DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file> -DLLAVA_BUILD=OFF)
# llama-cpp-python 0.3.36's CMakeLists forces LLAMA_BUILD_COMMON on (a cache FORCE, so -D cannot undo it),
# but nothing loads llama-common (the wheel puts it in a stray top-level lib/; llama_cpp opens libllama and
# libggml from llama_cpp/lib only). Turning it
# off again here, before llama.cpp's option() reads it, drops 52 of the 127 objects and halves the build's
# CPU time (measured 2026-12-02: 633 -> 316 CPU-seconds; docs/export.md). LLAVA_BUILD=OFF drops libmtmd
# (multimodal), which nothing here uses.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
