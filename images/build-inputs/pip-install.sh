#!/bin/sh
# Run "pip install" inside an image build with the repository's constraints,
# trusting an extra certificate authority when the build context provides one
# (for networks behind a TLS-inspecting proxy).
set -eu
if [ -f /build/ca-bundle.crt ]; then
    export PIP_CERT=/build/ca-bundle.crt
fi
exec pip --no-cache-dir --disable-pip-version-check install -c /build/constraints.txt "$@"
