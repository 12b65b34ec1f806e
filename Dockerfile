# syntax=docker/dockerfile:1
# oneclick-relay container image (see docs/deployment.md).
#
#   docker build -t oneclick-relay .
#   docker run -d --name oneclick-relay --stop-timeout 45 \
#     -v /etc/oneclick-relay:/etc/oneclick-relay:ro \
#     -p 127.0.0.1:2525:2525 -p 127.0.0.1:8080:8080 oneclick-relay
#
# In the mounted config, listen on all container interfaces ("0.0.0.0:2525",
# "0.0.0.0:8080"), allow the Docker networks in smtp.allowed_networks, and set
# redis.url to a real Redis. The files must be readable by uid/gid 10001.
#
# The image has no embedded Redis: without redis.url the relay exits at start. For a
# trial with the embedded one, build with --build-arg EXTRAS=fast,embedded and run with
# `docker run --init` (an init as PID 1 reaps the Redis child if the relay dies).

# pip extras installed into the image: fast = uvloop.
ARG EXTRAS=fast

# --- builder: one wheel for the project and one for each dependency -------------------
FROM python:3.12-slim AS builder
ARG EXTRAS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --wheel-dir /wheels ".[${EXTRAS}]"

# --- runtime ------------------------------------------------------------------------
FROM python:3.12-slim
ARG EXTRAS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    ONECLICK_RELAY_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
# Installed offline from the builder's wheels.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "oneclick-relay[${EXTRAS}]" \
 && groupadd --system --gid 10001 oneclick-relay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin oneclick-relay \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/oneclick-relay

# state_dir: the unsubscribe journal, kept while Redis is unreachable (-v …:/var/lib/oneclick-relay).
VOLUME /var/lib/oneclick-relay

# Config, token secrets and DKIM keys: mount read-only here (-v …:/etc/oneclick-relay:ro).
USER 10001:10001

# smtp.listen and http.listen of the mounted config.
EXPOSE 2525 8080

# 200 when Redis answers, 503 (→ exit 1) otherwise. No curl in the slim image: urllib.
# Another http.listen port: set ONECLICK_RELAY_HEALTHCHECK_URL (docker run -e …).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen(os.environ.get('ONECLICK_RELAY_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=4)"]

# The relay runs as PID 1 (exec form, no shell in between) and handles SIGTERM itself:
# it stops accepting, finishes in-flight transactions (smtp.drain_timeout, 30 s) and
# exits 0. Docker's default stop timeout is 10 s: use `docker stop -t 45`,
# `docker run --stop-timeout 45` or compose's `stop_grace_period: 45s`.
# With an embedded Redis (no redis.url, EXTRAS=fast,embedded) the relay has a child
# process: add `docker run --init` so that an init, not the relay, is PID 1 and reaps it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["oneclick-relay"]
CMD ["serve", "-c", "/etc/oneclick-relay/config.yaml"]
