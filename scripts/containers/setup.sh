#!/usr/bin/env bash
# Prepare a fresh Debian machine (run as root) to build and run medfed's
# containers with podman. The steps install the engine, write the project's
# engine settings, make the base image from Debian packages when it is
# missing, and serve the Docker Engine API on a socket under .podman/.
#
# Idempotent: each step checks whether its result already exists. Callers load
# the environment it prepares with `source .podman/env` (CONTAINERS_CONF,
# DOCKER_HOST). Step timings go to .podman/setup-timings.json.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="$ROOT/.podman"
BASE_IMAGE="${MEDFED_BASE_IMAGE:-localhost/medfed-base:bookworm}"
SOCKET="$STATE/podman.sock"
mkdir -p "$STATE"

TIMINGS=()
elapsed_since() {
    awk -v start="$1" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.1f", now - start }'
}

step() {
    # Run one named step and record its wall time in seconds.
    local name="$1"
    shift
    local start="$EPOCHREALTIME"
    echo "setup: $name" >&2
    "$@"
    TIMINGS+=("\"$name\": $(elapsed_since "$start")")
}

install_packages() {
    local wanted=(podman runc debootstrap uidmap slirp4netns fuse-overlayfs curl)
    local missing=()
    for package in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$package")
    done
    if ((${#missing[@]} > 0)); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

write_engine_settings() {
    # crun fails on this kernel's hybrid cgroup layout and raising the
    # open-files limit is not permitted, hence runc, cgroupfs and no ulimits.
    cat >"$STATE/containers.conf" <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    cat >"$STATE/env" <<ENV
export CONTAINERS_CONF="$STATE/containers.conf"
export DOCKER_HOST="unix://$SOCKET"
ENV
}

build_base_image() {
    if podman image exists "$BASE_IMAGE"; then
        echo "setup: $BASE_IMAGE already exists" >&2
        return
    fi
    local rootfs
    rootfs="$(mktemp -d "$STATE/rootfs.XXXXXX")"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log" >&2; return 1; }
    # The archive lists and package cache are not needed at run time.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

start_api_service() {
    local pid_file="$STATE/service.pid"
    if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "setup: podman API service already running (pid $(cat "$pid_file"))" >&2
        return
    fi
    rm -f "$SOCKET"
    setsid podman system service --time=0 "unix://$SOCKET" \
        >"$STATE/service.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
    local waited=0
    until [[ -S "$SOCKET" ]] && curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; do
        if ((waited >= 30)); then
            echo "setup: podman API service did not respond on $SOCKET within 30 s:" >&2
            tail -20 "$STATE/service.log" >&2
            return 1
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
}

start_all="$EPOCHREALTIME"
step install_packages install_packages
step write_engine_settings write_engine_settings
export CONTAINERS_CONF="$STATE/containers.conf"
step build_base_image build_base_image
step start_api_service start_api_service
TIMINGS+=("\"total\": $(elapsed_since "$start_all")")

{
    echo "{"
    for i in "${!TIMINGS[@]}"; do
        sep=","
        ((i == ${#TIMINGS[@]} - 1)) && sep=""
        echo "  ${TIMINGS[$i]}$sep"
    done
    echo "}"
} >"$STATE/setup-timings.json"
cat "$STATE/setup-timings.json" >&2
echo "setup: done; run 'source $STATE/env' to use the engine" >&2
