# The Meter image: the `meter` CLI, Celery workers and beat (see docker-compose.yml).
#   docker build -t meter .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the wheel needs: metadata first, so the dependency layer is cached.
COPY pyproject.toml README.md ./
COPY meter ./meter
COPY worker ./worker
COPY sql ./sql
# The runtime dependencies, no dev extras (servers come from the compose file), plus
# Flower for the monitoring service.
RUN pip install . "flower>=2.0"

# Celery refuses nothing as root, but nothing here needs root either.
RUN useradd --system --uid 10001 --home-dir /app meter
USER meter

# Each compose service gives its own command: `meter migrate`, `celery -A worker worker`...
CMD ["meter", "--help"]
