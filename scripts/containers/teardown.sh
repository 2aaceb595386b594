#!/usr/bin/env bash
# Stop the podman API service that setup.sh started, by its recorded process
# id. Images and volumes stay, so the next setup.sh and builds reuse them.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="$ROOT/.podman"
PID_FILE="$STATE/service.pid"

if [[ ! -f "$PID_FILE" ]]; then
    echo "teardown: no podman API service recorded in $PID_FILE" >&2
    exit 0
fi
pid="$(cat "$PID_FILE")"
if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "teardown: podman API service (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid"
    fi
fi
rm -f "$PID_FILE" "$STATE/podman.sock"
echo "teardown: stopped podman API service (pid $pid)" >&2
