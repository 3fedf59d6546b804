# syntax=docker/dockerfile:1
#
# One image for all five services; the command picks which one runs:
#   docker run IMAGE gateway | report_service | bank_connector | notifier | bank_sim [ARGS]
# (ENTRYPOINT is `python -m`; deploy/k8s sets the service as each container's args).
#
# Built for a read-only root filesystem: the only writes are to CARDCHECK_DATA_DIR and /tmp,
# which the Kubernetes manifests mount as emptyDir volumes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the project and its pinned dependencies into a virtualenv ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/cardcheck
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY cardcheck ./cardcheck
COPY gateway ./gateway
COPY report_service ./report_service
COPY bank_connector ./bank_connector
COPY notifier ./notifier
COPY bank_sim ./bank_sim
# A regular install, not an editable one: the runtime stage takes the virtualenv alone, with no
# source tree beside it. pip compiles the bytecode here, since nothing can write it at run time.
RUN /opt/cardcheck/bin/pip install -c /src/constraints.txt /src

# --- runtime: the virtualenv on a clean base, run as an unprivileged user ------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 cardcheck \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin cardcheck \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/cardcheck
COPY --from=build /opt/cardcheck /opt/cardcheck
ENV PATH=/opt/cardcheck/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CARDCHECK_DATA_DIR=/var/lib/cardcheck \
    CARDCHECK_BIND_HOST=0.0.0.0 \
    CARDCHECK_LOG_FORMAT=json
WORKDIR /var/lib/cardcheck
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051 50052 50053 50054 50060
ENTRYPOINT ["/opt/cardcheck/bin/python", "-m"]
CMD ["gateway"]
