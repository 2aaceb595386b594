# The medfed aggregation service: receives site updates over HTTP, keeps round
# state under /state and publishes global model versions. It needs no torch.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PATH=/opt/medfed/venv/bin:$PATH
COPY constraints.txt images/build-inputs/ /build/
COPY images/requirements/aggregation.txt /build/requirements.txt
RUN python3 -m venv /opt/medfed/venv \
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
    MEDFED_AGGREGATION_PORT=8600
VOLUME /state
USER medfed
WORKDIR /home/medfed
EXPOSE 8600
CMD ["sh", "-c", "exec medfed serve-aggregator --host 0.0.0.0 --port \"$MEDFED_AGGREGATION_PORT\" --state-dir /state"]
