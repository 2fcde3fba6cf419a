# syntax=docker/dockerfile:1
#
# One image for every process of a taskgate deployment:
#
#   taskgate serve                    (default CMD: the gRPC gateway on 0.0.0.0:50051)
#   taskgate migrate                  (one-shot: create the database, apply migrations)
#   celery -A workers worker -l INFO
#   celery -A workers beat -l INFO
#
# Targets:  runtime (the default, last stage)  and  flower (runtime + the Flower monitor).
#
# The generated gRPC code is committed in taskgate/v1/, so there is no protoc step, and every
# dependency ships manylinux wheels, so no compiler is needed: the build stage only keeps the
# source tree and pip's build environment out of the final image.
#
# Dependencies come from requirements/runtime.txt, a lock with a hash for every file
# (`make lock` writes it from both pyproject.toml files; CI fails if it is stale). The two
# local distributions, the client (clients/python, name taskgate) and the server
# (taskgate-server), are then installed with --no-deps, so nothing unpinned gets in.
#
# No HEALTHCHECK here on purpose: the same image also runs the worker, beat and migrate, which
# do not serve gRPC, so an image-level gRPC check would mark them unhealthy. The gateway's
# check lives in docker-compose.yml (a Python one-liner calling grpc.health.v1.Health/Check
# through grpc_health, which is installed; no extra tools needed).

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first (from the lock), so editing the code does not reinstall them.
COPY requirements/runtime.txt /tmp/runtime.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/runtime.txt

# The client (its build backend, hatchling, comes from the index into pip's isolated build
# environment, which stays in this stage), then the server.
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY taskgate ./taskgate
COPY service ./service
COPY workers ./workers
RUN pip install --no-cache-dir --no-deps ./clients/python . \
 && pip check \
 && taskgate --help > /dev/null

# --------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base

LABEL org.opencontainers.image.title="taskgate" \
      org.opencontainers.image.description="An async gRPC front door to Celery"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TASKGATE_LISTEN=0.0.0.0:50051

# A fixed, non-root uid/gid (numeric in USER so runAsNonRoot-style checks can verify it).
# Its home is the working directory: writable, e.g. for celery beat's celerybeat-schedule.
RUN groupadd --system --gid 10001 taskgate \
 && useradd --system --uid 10001 --gid taskgate --create-home --home-dir /home/taskgate \
        --shell /usr/sbin/nologin taskgate

COPY --from=build /opt/venv /opt/venv

WORKDIR /home/taskgate
USER 10001:10001

EXPOSE 50051
CMD ["taskgate", "serve"]

# --------------------------------------------------------------------------- flower
# Flower is not a project dependency: this target adds a pinned version on top of the app
# image, so `celery -A workers flower` sees the same Celery app and broker options
# (TASKGATE_KEY_PREFIX, visibility timeout) as the workers.
FROM base AS flower

ARG FLOWER_VERSION=2.2.0

USER 0
RUN pip install --no-cache-dir --disable-pip-version-check "flower==${FLOWER_VERSION}"
USER 10001:10001

EXPOSE 5555
CMD ["celery", "-A", "workers", "flower", "--port=5555"]

# --------------------------------------------------------------------------- runtime
# The default target (last stage): everything from base, still as the non-root user.
FROM base AS runtime

USER 10001:10001
