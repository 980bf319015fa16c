# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with the generated protobuf code, then a slim,
# non-root runtime that runs the gateway on the default config.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY telematics ./telematics
COPY sim ./sim
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
RUN groupadd --system gateway && useradd --system --gid gateway --home-dir /app gateway
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config ./config
RUN install -d -m 0700 -o gateway -g gateway /var/lib/privacy-gateway
USER gateway
VOLUME ["/var/lib/privacy-gateway"]
ENV PYTHONUNBUFFERED=1
# Brokers are given at run time, e.g.
#   docker run IMAGE --vehicle-broker mqtt://broker:1883 --backend-broker mqtts://tsp:8883
ENTRYPOINT ["python", "-m", "gateway", "run", "--config", "/app/config/gateway.toml", "--state-dir", "/var/lib/privacy-gateway", "--json-logs"]
STOPSIGNAL SIGTERM
