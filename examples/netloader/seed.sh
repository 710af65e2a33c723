#!/usr/bin/env bash
# Start a Netloader seed: a vLLM server that loads MODEL (from disk, or from the seeds in
# $SOURCE, which is what client.sh sets) and then serves its weights to other instances.
#
#   examples/netloader/seed.sh [MODEL] [more vLLM arguments...]
#
# The defaults suit a small CPU box (--enforce-eager --max-model-len 512); arguments
# given here come later and win, e.g. --no-enforce-eager --max-model-len 8192.
#
# Prints one line per rank once the server is healthy:
#   netloader: rank 0 seed listening on 127.0.0.1:41721
#
# Environment (all optional):
#   PORT            OpenAI API port (8000)
#   HOST            OpenAI API host (127.0.0.1)
#   LISTEN_PORT     Netloader port of rank 0, rank r uses LISTEN_PORT + r (a free port)
#   OUTPUT_PREFIX   where each rank writes its ip:port (/tmp/netloader-$PORT-)
#   SOURCE          seeds to load from: ip:port[,ip:port...] for rank 0, or a SOURCE JSON list
#   SECRET_FILE     file holding the shared secret ($NETLOADER_SECRET works too)
#   CONFIG_FILE     JSON file with more Netloader keys (TIMEOUT, BUCKET_MB, ...)
#   VLLM_HOST_IP    address the seed listens on and tells clients (127.0.0.1)
#   PYTHON          interpreter with vLLM and this package installed (python)
set -euo pipefail

MODEL=${1:-.models/tiny-qwen2}
shift $(($# > 0 ? 1 : 0))
PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-${TMPDIR:-/tmp}/netloader-$PORT-}
export VLLM_HOST_IP=${VLLM_HOST_IP:-127.0.0.1}
# vLLM CPU only: KV cache GiB and the cores of this instance (client.sh uses core 1).
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0}

config="\"OUTPUT_PREFIX\": \"$OUTPUT_PREFIX\""
[ -n "${LISTEN_PORT:-}" ] && config+=", \"LISTEN_PORT\": $LISTEN_PORT"
[ -n "${SECRET_FILE:-}" ] && config+=", \"SECRET_FILE\": \"$SECRET_FILE\""
[ -n "${CONFIG_FILE:-}" ] && config+=", \"CONFIG_FILE\": \"$CONFIG_FILE\""
case "${SOURCE:-}" in
    "") ;;
    \[*) config+=", \"SOURCE\": $SOURCE" ;;
    *) config+=", \"SOURCE\": [{\"device_id\": 0, \"sources\": [\"${SOURCE//,/\", \"}\"]}]" ;;
esac

rm -f "$OUTPUT_PREFIX"[0-9]*.txt
"${PYTHON:-python}" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --host "$HOST" --port "$PORT" \
    --load-format netloader --model-loader-extra-config "{$config}" \
    --enforce-eager --max-model-len 512 "$@" &
server=$!
# Ctrl-C or SIGTERM to this script stops the server too.
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" || true' EXIT
trap 'exit 143' INT TERM

until curl -sf "http://$HOST:$PORT/health" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "netloader: vLLM exited during start-up" >&2; exit 1; }
    sleep 1
done
for file in "$OUTPUT_PREFIX"[0-9]*.txt; do
    rank=${file#"$OUTPUT_PREFIX"}
    echo "netloader: rank ${rank%.txt} seed listening on $(cat "$file")"
done
echo "netloader: serving $MODEL on http://$HOST:$PORT"
wait "$server"
