# The medfed coordinator: Prefect server, MLflow tracking server and the
# federated_training flow. One image; each server runs in its own container
# (see compose.yaml), the Prefect server by default.
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
COPY pyproject.toml /build/pyproject.toml
RUN python3 /build/project-requirements.py /build/pyproject.toml >/build/requirements.txt \
    && sh /build/pip-install.sh -r /build/requirements.txt
COPY . /src/
RUN sh /build/medfed-wheel.sh

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 medfed \
    && useradd --uid 10001 --gid medfed --create-home \
        --home-dir /home/medfed --shell /usr/sbin/nologin medfed \
    && mkdir -p /state \
    && chown medfed:medfed /state
COPY --from=build /opt/medfed/venv /opt/medfed/venv
COPY --from=build /build/dist /tmp/dist
RUN /opt/medfed/venv/bin/pip --no-cache-dir --disable-pip-version-check install \
        --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist
ENV PATH=/opt/medfed/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/state/prefect \
    PREFECT_SERVER_API_HOST=0.0.0.0 \
    PREFECT_SERVER_API_PORT=4200 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_UI_ENABLED=true
VOLUME /state
USER medfed
WORKDIR /home/medfed
EXPOSE 4200 5000
CMD ["prefect", "server", "start"]
