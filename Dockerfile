# syntax=docker/dockerfile:1
# Kiln's runner image: `kiln serve` registers the deployments (pipeline, each stage, the scheduled
# corpus refresh) with a Prefect server and runs them. See docker-compose.yml.
#
#   docker build -t kiln .                                   # CPU torch (the default)
#   docker build -t kiln:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

# The Makefile's two-step rule: torch first, on its own, from PyTorch's own index (CPU wheels by
# default, a CUDA build with the ARG); then the project, through constraints.txt, finds
# torch==2.13.0 already satisfied and cannot pull another build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    KILN_DATA=/data

RUN groupadd --gid 1000 kiln \
    && useradd --uid 1000 --gid kiln --create-home --shell /usr/sbin/nologin kiln

WORKDIR /app

# Step 1: torch, alone.
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 -c constraints.txt

# Step 2: the project, editable (configs/ is found beside the code). The dependencies are installed
# against empty package stubs so that this layer is only rebuilt when pyproject.toml or
# constraints.txt change; the editable finder maps each top-level package to /app/<package>,
# where the real code is copied next. (A new top-level package needs an entry here.)
COPY pyproject.toml README.md ./
RUN mkdir flows pipelines model storage \
    && touch flows/__init__.py pipelines/__init__.py model/__init__.py storage/__init__.py \
    && pip install -e . -c constraints.txt

COPY configs/ configs/
COPY storage/ storage/
COPY pipelines/ pipelines/
COPY model/ model/
COPY flows/ flows/
RUN python -c "import flows.cli, flows.deployments" && kiln --help > /dev/null

# The artifact store. A named volume mounted here starts as a copy of this directory, owned by
# the runner's user; the scheduled refresh reads the crawl files dropped into /data/crawl.
RUN mkdir -p /data/crawl && chown -R kiln:kiln /data

USER kiln

CMD ["kiln", "serve", "--data-dir", "/data", "--refresh-input", "/data/crawl"]
