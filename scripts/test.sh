#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: unit tests and the
# real vLLM CPU engine on SmolLM2-135M. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_PLUGINS=vllm_spec_plugins
exec .venv/bin/python -m pytest -p no:cacheprovider -q --durations=20 "$@" tests
