# A medfed site: a Prefect worker that polls the work pool site-<MEDFED_SITE_ID>
# and runs the site_round flow against the data mounted read-only at /data.
# It listens on no port; it only opens connections to the Prefect API and the
# aggregation service.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/medfed/venv/bin:$PATH
COPY constraints.txt images/build-inputs/ /build/
# The site and coordinator images start with the same steps up to here and in
# the next one, so a machine that builds both installs torch once.
RUN set -eu; \
    python3 -m venv /opt/medfed/venv; \
    wheel="$(ls /build/wheels/torch-*.whl 2>/dev/null | head -n 1 || true)"; \
    if [ -n "$wheel" ]; then \
        sh /build/pip-install.sh "$wheel"; \
    else \
        sh /build/pip-install.sh --extra-index-url "$TORCH_INDEX_URL" torch; \
    fi
COPY images/requirements/site.txt /build/requirements.txt
RUN sh /build/pip-install.sh -r /build/requirements.txt
COPY . /src/
RUN sh /build/medfed-wheel.sh

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 medfed \
    && useradd --uid 10001 --gid medfed --create-home \
        --home-dir /home/medfed --shell /usr/sbin/nologin medfed \
    && mkdir -p /data /state /run/secrets/medfed \
    && chown medfed:medfed /state
COPY --from=build /opt/medfed/venv /opt/medfed/venv
COPY --from=build /build/dist /tmp/dist
RUN /opt/medfed/venv/bin/pip --no-cache-dir --disable-pip-version-check install \
        --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist
ENV PATH=/opt/medfed/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MEDFED_DATA_DIR=/data \
    MEDFED_SITE_STATE_DIR=/state \
    PREFECT_HOME=/state/prefect
# /state holds the privacy ledger and the worker's files; a named volume keeps
# them across container restarts.
VOLUME /state
USER medfed
WORKDIR /home/medfed
CMD ["sh", "-c", "exec prefect worker start --pool \"site-${MEDFED_SITE_ID:?set MEDFED_SITE_ID to this site's id}\" --type process"]
