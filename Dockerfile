# One image for every migctl process (bridge, worker, beat, gateway, flower, webhook):
# the command picks the process (see Procfile and docker-compose.yml).
# Configuration comes at run time: env vars, and optionally a YAML file mounted at
# /etc/migctl and named by MIGCTL_CONFIG or --config. No secret is baked in.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README* matches nothing when there is no README; pyproject.toml keeps the COPY valid.
COPY pyproject.toml README* ./
COPY migctl ./migctl
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 migctl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/migctl --create-home migctl \
    && mkdir -p /etc/migctl
USER migctl
WORKDIR /home/migctl
# gateway gRPC, HTTP (/health, /ready, /stats, /metrics), flower.
EXPOSE 50051 8080 5555
CMD ["migctl", "--help"]
