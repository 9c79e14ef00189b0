# The project image: the wysiwyc package with exactly the versions the test suite passed with
# (requirements.lock: torch 2.14.1 with its CUDA 13 libraries as pip wheels, Ray, MLflow, boto3 ...), run as
# a non-root user. Used by every pod of k8s/ (Ray head and workers, the MLflow server, the attribution submitter):
#   docker build -t wysiwyc:0.1.0 .
#   docker run --rm --gpus all wysiwyc:0.1.0 train explainer -c configs/paper/voc_vgg16.yaml ...
# Base: the Python the lock was made with (3.11.7), Debian slim; the GPU driver comes from the node (NVIDIA
# container toolkit), CUDA and cuDNN from the lock's nvidia-* wheels, so no second torch hides in a base image
# (a pytorch/pytorch base kept its own torch 2.5.1, open to CVE-2025-32434's bypass of weights_only loading).
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app

# the package with every dependency at the lock's version (-c: pip may install nothing else); psycopg2 is the
# MLflow server's driver for the RDS postgres (k8s/, infra/), the one package outside the lock (the tests use
# sqlite), pinned here.
COPY pyproject.toml README.md requirements.lock ./
COPY pipeline ./pipeline
RUN pip install -c requirements.lock . "psycopg2-binary==2.9.13"

# the presets ship in the package (-c paper/voc_vgg16 works anywhere); /app/configs links to them for the
# manifests that name files (-c /app/configs/...)
COPY configs ./configs

# non-root: uid 10001 (the manifests' runAsUser), owning nothing but its home
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin wysiwyc
USER 10001
ENV HOME=/home/wysiwyc

ENTRYPOINT ["wysiwyc"]
CMD ["--help"]
