# The serving image: the REST API + Gradio app over the exported ONNX models. No torch.
# Build after `make run` (or `dvc pull`), so models/*/model.onnx and model.json exist:
#   docker build -t model-train-serve . && docker run -p 7860:7860 model-train-serve
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    APP_HOST=0.0.0.0 \
    APP_PORT=7860

WORKDIR /srv
COPY pyproject.toml README.md params.yaml ./
COPY stages/ stages/
COPY app/ app/
# The project itself, with the dependency ranges pinned in pyproject.toml's `serve` extra.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
    && useradd --create-home --uid 10001 app
COPY models/tabular/model.onnx models/tabular/model.json models/tabular/
COPY models/image/model.onnx models/image/model.json models/image/
COPY models/detect/model.onnx models/detect/model.json models/detect/

USER 10001
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health')"]
CMD ["python", "-m", "app.server"]
