"""Run the real Triton Inference Server binary shipped in the `nvidia-pytriton` wheel, on CPU."""

from localtriton.server import TritonServer, TritonSettings

__all__ = ["TritonServer", "TritonSettings"]
