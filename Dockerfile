FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY orchestrator ./orchestrator
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --create-home orchestrator
USER orchestrator

ENV ORCHESTRATOR_WORKFLOWS=workers
CMD ["orchestrator", "worker"]
