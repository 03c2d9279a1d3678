# The KServe retriever (transformer). No CUDA needed: the towers run in Triton.
#   docker build -f docker/retriever.Dockerfile -t ghcr.io/hm-two-tower/retriever:0.1.0 .
#   --build-arg FAISS=faiss-gpu-cu12   for GPU search on a GPU node (never both faiss packages)
FROM python:3.11-slim AS build
ARG FAISS=faiss-cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY twotower twotower
COPY serving serving
COPY export export
COPY evaluation evaluation
COPY retriever retriever
COPY localtriton localtriton
COPY benchmarks benchmarks
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && if [ "$FAISS" != "faiss-cpu" ]; then /opt/venv/bin/pip uninstall -y faiss-cpu && /opt/venv/bin/pip install --no-cache-dir "$FAISS"; fi

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
# non-root, and nothing writable but /tmp (mounted as an emptyDir by the manifests)
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin retriever
USER 10001
ENV PATH=/opt/venv/bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["python", "-m", "retriever"]
CMD ["--http_port=8080"]
