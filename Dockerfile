# syntax=docker/dockerfile:1
#
# Two stages: the builder installs the dependencies and the realtime package into /opt/venv; the runtime image
# copies that venv alone and runs as an unprivileged user. The package carries its migrations, capture SQL and
# demo page (pyproject.toml maps them in), so the image holds no source tree and needs no PYTHONPATH.

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && /opt/venv/bin/pip install -r requirements.txt

# Then the project itself: `pip install .` builds a wheel from these folders and installs it.
COPY realtime/ realtime/
COPY migrations/ migrations/
COPY triggers/ triggers/
COPY web_demo/ web_demo/
RUN /opt/venv/bin/pip install --no-deps .


FROM python:3.11-slim AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    EMBEDDED_DATA_DIR=/data/pgdata

# HOST=0.0.0.0 is reachable from outside the container, so `realtime serve` refuses to start without
# authentication: pass a token key (`-e AUTH_JWT_SECRET=...`, or AUTH_JWKS_URL / AUTH_PUBLIC_KEY_FILE), or
# `-e AUTH_MODE=none` to serve open on purpose (whoever reaches the port can read and change every streamed table).
RUN groupadd --system --gid 10001 realtime \
    && useradd --system --uid 10001 --gid realtime --home-dir /app --no-create-home --shell /usr/sbin/nologin realtime \
    && mkdir /data \
    && chown realtime:realtime /data

# /app is only the working directory (where a `.env` file would be read), empty and read-only to the user.
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv

USER realtime
EXPOSE 8000

# Binding 0.0.0.0 makes the default ALLOWED_HOSTS "any name". Set it to the names clients use, e.g.
# `-e ALLOWED_HOSTS=realtime.example.com`, and ALLOWED_ORIGINS to any front-end served from another origin, e.g.
# `-e ALLOWED_ORIGINS=https://app.example.com` (docs/security.md). The HEALTHCHECK below asks 127.0.0.1, a
# loopback name, which is always allowed.

# slim has no curl: probe liveness with the interpreter that is there anyway.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=2)"]

# `serve` applies the migrations before it listens (MIGRATE_ON_START=true) and then runs uvicorn in this
# process, so SIGTERM from `docker stop` reaches it directly and shuts it down gracefully (exit status 0).
CMD ["realtime", "serve"]
