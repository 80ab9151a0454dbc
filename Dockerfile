# syntax=docker/dockerfile:1
# The outbox relay image: `docker build -t ghcr.io/example/outbox:0.1.0 .`
#
# Stage 1 builds wheels for outbox and every dependency (all of them ship manylinux wheels, so
# no compiler is needed even here); stage 2 installs those wheels into a virtualenv on a clean
# slim base. The final image holds no build tools, no sources and no pip cache, and runs as a
# fixed non-root UID so Kubernetes can enforce runAsNonRoot.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY alembic ./alembic
# with the `otel` extra: tracing stays off until OTEL_TRACES_EXPORTER names an exporter
RUN pip wheel --wheel-dir /wheels '.[otel]' \
 && python -m venv /opt/outbox \
 && /opt/outbox/bin/pip install --no-index --find-links=/wheels "$(echo /wheels/outbox-*.whl)[otel]" \
 && /opt/outbox/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outbox" \
      org.opencontainers.image.description="Transactional-outbox relay: PostgreSQL -> RabbitMQ" \
      org.opencontainers.image.licenses="Apache-2.0"
# Bytecode is compiled at install time; the root filesystem is read-only at run time.
ENV PATH=/opt/outbox/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin outbox
COPY --from=build /opt/outbox /opt/outbox
USER 10001:10001
# /metrics, /healthz, /readyz (OUTBOX_HTTP_PORT)
EXPOSE 9487
ENTRYPOINT ["outbox"]
CMD ["relay"]
