FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY orchestrator ./orchestrator
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --create-home orchestrator
USER orchestrator

# Unbuffered, so `docker compose logs` shows a run's progress as it happens.
ENV PYTHONUNBUFFERED=1 ORCHESTRATOR_WORKFLOWS=workers
CMD ["orchestrator", "worker"]
