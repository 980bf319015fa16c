# syntax=docker/dockerfile:1
# The gateway in a container: a virtual environment built in one stage, a
# slim non-root runtime with nothing else (no simulator, benchmarks, tests,
# dev tools or pip).
#
#   docker build --build-arg COMMIT="$(git rev-parse HEAD)" -t privacy-gateway .
#   docker volume create gateway-state
#   docker run --rm -v gateway-state:/var/lib/privacy-gateway privacy-gateway init
#   docker run -d -v gateway-state:/var/lib/privacy-gateway -p 8080:8080 -p 8081:8081 \
#     -e GATEWAY_VEHICLE_BROKER__URL=mqtts://vehicles:8883 \
#     -e GATEWAY_BACKEND_BROKER__URL=mqtts://tsp:8883 \
#     -e GATEWAY_CONTROL__ALLOW_PLAINTEXT=true privacy-gateway
#
# The control plane listens on all interfaces: give it TLS
# (GATEWAY_CONTROL__TLS_CERT and GATEWAY_CONTROL__TLS_KEY, files mounted from
# secrets) or opt out explicitly with GATEWAY_CONTROL__ALLOW_PLAINTEXT=true;
# otherwise the gateway refuses to start. The state volume must be
# initialised once (`init` above): a container started without it exits 2
# rather than make up a new pseudonymization key.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when pyproject.toml
# (or the install script) changes, not on every source change.
COPY pyproject.toml scripts/install-runtime.sh ./
RUN sh install-runtime.sh deps /opt/privacy-gateway
COPY README.md ./
COPY gateway ./gateway
COPY telematics ./telematics
RUN sh install-runtime.sh project /opt/privacy-gateway
# The decision core and the MQTT codec compiled to C (mypyc): a compiler and
# mypy in this stage only; the runtime gets the built modules and neither tool.
RUN command -v cc >/dev/null || (apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*)
COPY scripts/compile_native.py ./
RUN sh install-runtime.sh compile /opt/privacy-gateway

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin gateway \
 && install -d -m 0700 -o gateway -g gateway /var/lib/privacy-gateway
COPY --from=build /opt/privacy-gateway /opt/privacy-gateway
COPY config/gateway.toml config/policy.yaml /app/config/
WORKDIR /app
ENV PATH=/opt/privacy-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_REQUIRE_INITIALIZED_STATE=true \
    GATEWAY_CONTROL__PROBE_LISTEN=0.0.0.0:8081
# 8080: control plane (token; TLS or the explicit opt-out), 8081: /healthz and /readyz only.
EXPOSE 8080 8081
VOLUME ["/var/lib/privacy-gateway"]
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "gateway"]
# The control plane's address is a flag of `run` (not in ENV): `init` and
# other commands then load the configuration without its TLS requirement.
CMD ["run", "--config", "/app/config/gateway.toml", "--state-dir", "/var/lib/privacy-gateway", \
     "--control-listen", "0.0.0.0:8080", "--json-logs"]
# Last, so that a new commit rebuilds nothing above: gateway_build_info{commit}.
ARG COMMIT=unknown
ENV PRIVACY_GATEWAY_COMMIT=${COMMIT}
LABEL org.opencontainers.image.title="vehicle privacy gateway" \
      org.opencontainers.image.revision=${COMMIT}
