# A one-shot image that copies an exported model repository + index into the artifacts volume
# (the PVC `hm-artifacts`), run by the Job k8s/jobs/publish-artifacts.yaml.
#   python -m export ... --model-repository build/model_repository --index-dir build/index
#   docker build -f docker/artifacts-loader.Dockerfile -t ghcr.io/hm-two-tower/artifacts:<model-version> build/
# Model versions first (Triton loads them), index versions next, CURRENT last via rename: a retriever
# never reads a version whose files are still being copied (it would refuse it until CURRENT changes).
FROM busybox:1.36
COPY model_repository /artifacts/model_repository
COPY index /artifacts/index
USER 65534
ENTRYPOINT ["sh", "-euc", "\
mkdir -p /mnt/artifacts/model_repository /mnt/artifacts/index; \
cp -r /artifacts/model_repository/. /mnt/artifacts/model_repository/; \
for version in /artifacts/index/v*; do cp -r \"$version\" /mnt/artifacts/index/; done; \
cp /artifacts/index/CURRENT /mnt/artifacts/index/.CURRENT.tmp; \
mv /mnt/artifacts/index/.CURRENT.tmp /mnt/artifacts/index/CURRENT; \
echo published index \"$(cat /mnt/artifacts/index/CURRENT)\""]
