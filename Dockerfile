# The project image: CUDA PyTorch + the wysiwyc package (Ray, MLflow, boto3 ...), run as a non-root user.
# Used by every pod of k8s/ (Ray head and workers, the MLflow server, the attribution submitter):
#   docker build -t wysiwyc:0.1.0 .
#   docker run --rm --gpus all wysiwyc:0.1.0 train explainer -c configs/paper/voc_vgg16.yaml ...
# Base pinned by tag: CUDA 12.4 + cuDNN 9 runtime with torch 2.5.1 / torchvision 0.20.1 / Python 3.11,
# which satisfy the package's torch>=2.4 (pip keeps them instead of downloading another 2.5 GB).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app

# the package with its dependencies (torch/torchvision already in the base are kept); psycopg2 is the
# MLflow server's driver for the RDS postgres (k8s/, infra/).
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install . "psycopg2-binary==2.9.13"

# the presets ship in the package (-c paper/voc_vgg16 works anywhere); /app/configs links to them for the
# manifests that name files (-c /app/configs/...)
COPY configs ./configs

# non-root: uid 10001 (the manifests' runAsUser), owning nothing but its home
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin wysiwyc
USER 10001
ENV HOME=/home/wysiwyc

ENTRYPOINT ["wysiwyc"]
CMD ["--help"]
