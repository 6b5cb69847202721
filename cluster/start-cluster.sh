#!/usr/bin/env bash
# Start a Ray cluster by hand and run pdserve on it.
#
#   cluster/start-cluster.sh head                 on the head node (runs the router; no GPUs
#                                                 are offered to Ray there by default)
#   cluster/start-cluster.sh worker HEAD_IP       on every GPU node
#   cluster/start-cluster.sh serve [FLAGS...]     on the head: pdserve serve --ray-address
#                                                 auto, listening on 0.0.0.0, e.g.
#       cluster/start-cluster.sh serve --model /models/Llama-3.1-8B-Instruct \
#           --prefill-workers 2 --decode-workers 2 --gpus-per-worker 1 \
#           --api-key "$PDSERVE_API_KEY" --tls-cert cert.pem --tls-key key.pem
#   cluster/start-cluster.sh stop                 on any node: stop Ray there
#
# Every node needs the same Python environment with pdserve installed (same path), and
# the model at the same path (or use dummy:<preset> for benchmarks). Environment:
#   RAY_PORT (6379)          the head's GCS port; open it (and Ray's worker ports)
#                            between nodes, and only between nodes
#   RAY_METRICS_PORT (8080)  each node's Ray metrics (see cluster/prometheus.yml)
#   HEAD_GPUS (0)            GPUs the head offers to Ray; >0 puts workers there too
#   PDSERVE_HOST (0.0.0.0)   address pdserve listens on (gRPC and metrics)
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
RAY_METRICS_PORT="${RAY_METRICS_PORT:-8080}"
HEAD_GPUS="${HEAD_GPUS:-0}"
PDSERVE_HOST="${PDSERVE_HOST:-0.0.0.0}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
case "$cmd" in
  head)
    ray start --head --port="$RAY_PORT" --num-gpus="$HEAD_GPUS" \
      --metrics-export-port="$RAY_METRICS_PORT" --include-dashboard=false "$@"
    ;;
  worker)
    head_ip="${1:?usage: start-cluster.sh worker HEAD_IP}"
    shift
    ray start --address="${head_ip}:${RAY_PORT}" --metrics-export-port="$RAY_METRICS_PORT" "$@"
    ;;
  serve)
    # "auto": the cluster this node belongs to (the head started above).
    exec pdserve serve --ray-address auto --host "$PDSERVE_HOST" "$@"
    ;;
  stop)
    ray stop
    ;;
  *)
    usage
    ;;
esac
