#!/usr/bin/env bash
# Start a Ray cluster by hand and run pdserve on it.
#
#   cluster/start-cluster.sh head [RAY_START_FLAGS...]             on the head node (runs the
#                                          router; offers no GPUs to Ray there by default)
#   cluster/start-cluster.sh worker HEAD_IP [RAY_START_FLAGS...]   on every GPU node
#   cluster/start-cluster.sh serve [PDSERVE_FLAGS...]              on the head: pdserve serve
#                                          on this cluster, listening on $PDSERVE_HOST, e.g.
#       cluster/start-cluster.sh serve --model /models/Llama-3.1-8B-Instruct \
#           --prefill-workers 2 --decode-workers 2 --gpus-per-worker 1 \
#           --tls-cert cert.pem --tls-key key.pem      # and PDSERVE_API_KEY in the environment
#   cluster/start-cluster.sh stop                  on each node: Ray there, and first pdserve if
#                                          this node's `serve` runs it (SIGTERM: it drains). A
#                                          whole cluster: pdserve (Ctrl-C), the workers, the head
#
# Every node needs the same Python environment with pdserve[serve] installed (same path,
# same Ray version: Ray's metrics need ray[default], which pdserve[serve] brings), the model
# at the same path (or dummy:<preset>), and the head's Ray token: `head` makes one in
# ~/.ray/auth_token if there is none (`ray get-auth-token` prints it); copy it to the same
# path on every node, or set RAY_AUTH_TOKEN there. Flags after the command go to `ray start` / `pdserve
# serve` as they are. Environment:
#   RAY_PORT (6379)             the head's GCS port; open it (and Ray's worker ports)
#                               between nodes, and only between nodes
#   RAY_METRICS_PORT (8080)     each node's Ray metrics export port (cluster/prometheus.yml)
#   RAY_DASHBOARD_HOST (127.0.0.1), RAY_DASHBOARD_PORT (8265)   the head's Ray dashboard; it
#                               writes the metrics discovery file and accepts Ray jobs (code
#                               execution): keep it on loopback, reach it with ssh -L
#   RAY_TEMP_DIR (Ray's /tmp/ray)   this node's Ray directory (sessions, logs, the discovery
#                               file, `serve`'s pid file); when set, `stop` ends only the
#                               processes under it and the node's Ray client server, so
#                               several nodes can share one machine (docs/operations.md)
#   RAY_ADDRESS (the head's)    the cluster `serve` joins: HEAD_IP:RAY_PORT; by default the
#                               one `head` started under RAY_TEMP_DIR on this machine
#   RAY_AUTH_MODE (token)       Ray's authentication; exported to ray and pdserve
#   HEAD_GPUS (0)               GPUs the head offers to Ray; >0 puts workers there too
#   PDSERVE_HOST (0.0.0.0)      address pdserve listens on (gRPC, HTTP and metrics)
#   PDSERVE_STOP_S (60)         how long `stop` waits for pdserve to drain before SIGKILL
#   RAY_STOP_GRACE_S (16)       then how long for Ray's processes (`ray stop`'s default)
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
RAY_METRICS_PORT="${RAY_METRICS_PORT:-8080}"
RAY_DASHBOARD_HOST="${RAY_DASHBOARD_HOST:-127.0.0.1}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-}"
HEAD_GPUS="${HEAD_GPUS:-0}"
PDSERVE_HOST="${PDSERVE_HOST:-0.0.0.0}"
PDSERVE_STOP_S="${PDSERVE_STOP_S:-60}"
RAY_STOP_GRACE_S="${RAY_STOP_GRACE_S:-16}"
# Without it a worker node or the driver would connect unauthenticated and be refused.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Ray starts its workers at nice 15 (to keep its driver responsive); pdserve's workers
# are the service, so they run at the node's normal priority.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

ray_dir="${RAY_TEMP_DIR:-/tmp/ray}"
pid_file="$ray_dir/pdserve.pid"
temp_flags=()
[[ -z "$RAY_TEMP_DIR" ]] || temp_flags=(--temp-dir="$RAY_TEMP_DIR")

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }

# Waits up to $2 seconds for every pid in $1 (space-separated) to be gone (or a zombie,
# left for its parent to reap); 0 if they are.
wait_gone() {
  local pids="$1" deadline=$((SECONDS + $2)) pid alive state
  while :; do
    alive=""
    for pid in $pids; do
      state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
      if [[ -n "$state" && "$state" != Z* ]]; then alive="$alive $pid"; fi
    done
    [[ -n "$alive" ]] || return 0
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# pdserve first, so it drains (health NOT_SERVING, streams end) while its workers still live.
stop_pdserve() {
  [[ -f "$pid_file" ]] || return 0
  local pid
  pid="$(cat "$pid_file")"
  # Only our own `serve`: the pid may have been reused since.
  if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q 'pdserve serve'; then
    kill -TERM "$pid"
    wait_gone "$pid" "$PDSERVE_STOP_S" || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
}

# The processes whose command line names $RAY_TEMP_DIR (GCS, raylet, dashboard, monitors),
# the head's Ray client server (`python -m ray.util.client.server --address=GCS --port=...`,
# an orphan whose command line names not the directory but its node's id, which the raylet's
# does), and all their descendants (agents and workers rename themselves, so only their
# parent shows). The directory reaches awk through its environment: an argument would match
# awk. Another Ray node here, even of the same cluster, has another node id.
ray_processes_under() {
  ps -eo pid=,ppid=,args= | DIR="$RAY_TEMP_DIR/" awk '
    {
      pid[NR] = $1; ppid[NR] = $2; args[NR] = $0
      if (index($0, ENVIRON["DIR"]) > 0) {
        mine[$1] = 1
        s = $0  # the raylet: --node_id=ID
        while (match(s, /--node[-_]id=[0-9a-f]+/)) {
          node[substr(s, RSTART + 10, RLENGTH - 10)] = 1
          s = substr(s, RSTART + RLENGTH)
        }
      }
    }
    END {
      for (i = 1; i <= NR; i++)
        if (index(args[i], "ray.util.client.server") > 0)
          for (id in node)
            if (index(args[i] " ", "--node-id=" id " ") > 0) mine[pid[i]] = 1
      do {
        grown = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; grown = 1 }
      } while (grown)
      for (p in mine) print p
    }'
}

# SIGTERM, then SIGKILL after $RAY_STOP_GRACE_S, for the pids in $1 (space-separated).
terminate() {
  [[ -n "${1// /}" ]] || return 0
  # shellcheck disable=SC2086  # one word per pid
  kill -TERM $1 2>/dev/null || true
  # shellcheck disable=SC2086
  wait_gone "$1" "$RAY_STOP_GRACE_S" || kill -KILL $1 2>/dev/null || true
  wait_gone "$1" 10
}

stop_ray() {
  if [[ -z "$RAY_TEMP_DIR" ]]; then
    ray stop --grace-period "$RAY_STOP_GRACE_S"  # every Ray process here: dedicated nodes
    return
  fi
  local all gcs
  all="$(ray_processes_under | tr '\n' ' ')"
  gcs="$(pgrep -f "gcs_server .*$RAY_TEMP_DIR/" | tr '\n' ' ' || true)"
  # The GCS last: a raylet or the autoscaler's monitor whose GCS is gone ignores SIGTERM
  # (it keeps reconnecting), so it would wait out the whole grace period.
  terminate "$(tr ' ' '\n' <<<"$all" | grep -vxF -f <(tr ' ' '\n' <<<"$gcs") | tr '\n' ' ' || true)"
  terminate "$gcs"
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
case "$cmd" in
  head)
    # `ray start --head` refuses token mode without a token; this makes one only if none
    # exists (~/.ray/auth_token), and prints it: copy it to the workers.
    if [[ "$RAY_AUTH_MODE" == token ]]; then ray get-auth-token --generate >/dev/null; fi
    # --include-dashboard: the dashboard writes the Prometheus discovery file
    # ($ray_dir/prom_metrics_service_discovery.json) with every node's metrics address.
    ray start --head --port="$RAY_PORT" --num-gpus="$HEAD_GPUS" \
      --metrics-export-port="$RAY_METRICS_PORT" --include-dashboard=true \
      --dashboard-host="$RAY_DASHBOARD_HOST" --dashboard-port="$RAY_DASHBOARD_PORT" \
      "${temp_flags[@]}" "$@"
    ;;
  worker)
    head_ip="${1:?usage: start-cluster.sh worker HEAD_IP [RAY_START_FLAGS...]}"
    shift
    ray start --address="${head_ip}:${RAY_PORT}" --metrics-export-port="$RAY_METRICS_PORT" \
      "${temp_flags[@]}" "$@"
    ;;
  serve)
    address="${RAY_ADDRESS:-}"
    [[ -n "$address" ]] || address="$(cat "$ray_dir/ray_current_cluster" 2>/dev/null || true)"
    mkdir -p "$ray_dir"
    echo "$$" >"$pid_file"  # exec keeps this pid: `stop` signals pdserve itself
    exec pdserve serve --ray-address "${address:-auto}" --host "$PDSERVE_HOST" "$@"
    ;;
  stop)
    stop_pdserve
    stop_ray
    ;;
  *)
    usage
    ;;
esac
