#!/usr/bin/env bash
# Set up (first run only) and run the demo: suffix-tree proposer vs no speculation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/vllm-spec-plugins demo "$@"
