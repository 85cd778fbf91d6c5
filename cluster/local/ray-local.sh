#!/usr/bin/env bash
# A real two-node Ray cluster on this machine: a head and a second node as separate processes on
# 127.0.0.1, one CPU each by default, with token authentication on (Ray 2.60's default for
# `ray start --head`). Used by the multi-node tests and to try `shipyard submit` before a real cluster.
#
#   cluster/local/ray-local.sh up       start both nodes, wait until both are alive
#   cluster/local/ray-local.sh env      print the exports a client needs (never the token itself)
#   cluster/local/ray-local.sh status   list the nodes
#   cluster/local/ray-local.sh down     stop exactly these two nodes (never a plain `ray stop`,
#                                       which would kill every Ray process on the machine)
#
# Settings (environment): RAY_PORT (6390), RAY_DASHBOARD_PORT (8265), RAY_NODE_CPUS (1),
# SHIPYARD_CLUSTER_DIR (.shipyard/cluster: pids, logs, the token file), RAY (the `ray` command; default
# the project venv's). The token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if set, else a new random
# one in $SHIPYARD_CLUSTER_DIR/auth_token (mode 600). On a real cluster keep it in a secret store
# (a Kubernetes Secret, see cluster/README.md) and hand it to clients the same way.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${SHIPYARD_CLUSTER_DIR:-.shipyard/cluster}"
PORT="${RAY_PORT:-6390}"
DASH="${RAY_DASHBOARD_PORT:-8265}"
CPUS="${RAY_NODE_CPUS:-1}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY="$ROOT/.venv/bin/ray"; else RAY=ray; fi
fi
PYTHON="$(dirname "$(command -v "$RAY")")/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
# Jobs run `python -m shipyard.cli ...` on the head: make that the Python the nodes run.
export PATH="$(dirname "$PYTHON"):$PATH"

export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  export RAY_AUTH_TOKEN_PATH="$(mkdir -p "$STATE" && cd "$STATE" && pwd)/auth_token"
fi

alive_nodes() {
  "$PYTHON" - "$PORT" <<'PY' 2>/dev/null || echo 0
import logging, sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level=logging.ERROR, log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
}

wait_for_nodes() {
  local want=$1 deadline=$((SECONDS + 120))
  until [[ "$(alive_nodes | tail -1)" == "$want" ]]; do
    if (( SECONDS > deadline )); then
      echo "ray-local: timed out waiting for $want node(s); logs in $STATE/" >&2
      return 1
    fi
    sleep 2
  done
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_node() {  # name, args...: `ray start --block` in its own session, so `down` can stop its whole group
  local name=$1; shift
  setsid "$RAY" start --block --disable-usage-stats "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

stop_node() {
  local pidfile="$STATE/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 10); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done  # Ray drains up to 30 s
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  up)
    mkdir -p "$STATE"; chmod 700 "$STATE"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
    fi
    if [[ -f "$STATE/head.pid" ]] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
      echo "ray-local: already up (head pid $(cat "$STATE/head.pid")); '$0 down' first" >&2; exit 1
    fi
    # Each node gets its own temp dir and agent port, as on separate machines: nodes sharing a temp
    # dir garbage-collect each other's runtime-env files (e.g. a running job's working_dir), and a
    # second agent on the default port 52365 fails, so the Jobs API finds "no available agent".
    start_node head --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$CPUS" \
      --temp-dir="/tmp/shipyard-ray-$PORT-head" --dashboard-agent-listen-port="$(free_port)" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --include-dashboard=true
    wait_for_nodes 1
    start_node node2 --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
      --temp-dir="/tmp/shipyard-ray-$PORT-node2" --dashboard-agent-listen-port="$(free_port)"
    wait_for_nodes 2
    echo "ray-local: 2 nodes up at 127.0.0.1:$PORT, Jobs API at http://127.0.0.1:$DASH"
    echo "ray-local: clients need:  eval \"\$($0 env)\""
    ;;
  env)
    echo "export RAY_AUTH_MODE=token"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASH"
    ;;
  status)
    "$PYTHON" - "$PORT" <<'PY'
import logging, sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level=logging.ERROR, log_to_driver=False)
for n in ray.nodes():
    print(f"{n['NodeID'][:12]}  {'alive' if n['Alive'] else 'dead '}  {n['NodeManagerAddress']}  "
          f"CPU {n['Resources'].get('CPU', 0):g}")
PY
    ;;
  down)
    stop_node node2
    stop_node head
    echo "ray-local: stopped"
    ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
