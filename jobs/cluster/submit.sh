#!/usr/bin/env bash
# Entry point for `ray job submit ... -- bash jobs/cluster/submit.sh [extra capture flags]`.
# Runs on the cluster's driver; RAY_ADDRESS (set by Ray jobs) makes logitcache join the cluster, and
# --workers in the YAML starts one vLLM engine per 8 GPUs. Extra flags override the YAML, e.g.
#   bash jobs/cluster/submit.sh --workers 2 --max-tokens 100000000
set -euo pipefail
cd "$(dirname "$0")/../.."
pip install --quiet -e ".[ray]"   # the cluster image is expected to carry vllm and torch already
exec logitcache capture --config jobs/cluster/llama70b-tp8.yaml --quiet "$@"
