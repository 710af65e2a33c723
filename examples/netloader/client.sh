#!/usr/bin/env bash
# Start a Netloader client: a vLLM server that takes its weights from running seeds,
# tried in the order given (and from disk if none of them serves), then serves and
# seeds like any other instance.
#
#   examples/netloader/client.sh SEED_ADDRESS[,SEED_ADDRESS...] [MODEL] [more vLLM arguments...]
#
# SEED_ADDRESS is what seed.sh printed (ip:port of rank 0). The environment is the same
# as seed.sh's, with PORT 8001 and core 1 by default.
set -euo pipefail

export SOURCE=${1:?usage: client.sh SEED_ADDRESS[,SEED_ADDRESS...] [MODEL] [vLLM arguments...]}
shift
export PORT=${PORT:-8001}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-1}
exec "$(dirname "$0")/seed.sh" "$@"
