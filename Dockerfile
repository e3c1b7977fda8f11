# One image for the API, the migration step and the GPU worker (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app

# torch first, pinned: on Linux x86_64 PyPI's build carries CUDA, which the GPU worker needs
RUN pip install torch==2.13.0
COPY pyproject.toml README.md alembic.ini ./
COPY lomo_core lomo_core
COPY jobs jobs
COPY api api
COPY worker worker
COPY client client
COPY migrations migrations
RUN pip install .

# Every process reads the same shared folder for uploads, checkpoints and exported models.
VOLUME ["/data"]
EXPOSE 8000
CMD ["lomo", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
