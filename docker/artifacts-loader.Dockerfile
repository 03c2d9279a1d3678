# A one-shot image that copies an exported model repository + index into the artifacts volume
# (the PVC `hm-artifacts`), for clusters that do not pull them from object storage.
#   python -m export ... --model-repository build/model_repository --index-dir build/index
#   docker build -f docker/artifacts-loader.Dockerfile -t ghcr.io/hm-two-tower/artifacts:<model-version> build/
FROM busybox:1.36
COPY model_repository /artifacts/model_repository
COPY index /artifacts/index
USER 65534
ENTRYPOINT ["sh", "-c", "cp -r /artifacts/. /mnt/artifacts/ && ls -R /mnt/artifacts | head -20"]
