#!/bin/sh
# Build medfed's wheel from /src into /build/dist without its dependencies.
# The final image stage installs it offline, in a layer of its own, so a code
# change rebuilds only that small layer.
set -eu
if [ -f /build/ca-bundle.crt ]; then
    export PIP_CERT=/build/ca-bundle.crt
fi
exec pip --no-cache-dir --disable-pip-version-check wheel --no-deps --wheel-dir /build/dist /src
