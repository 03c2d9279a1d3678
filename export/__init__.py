"""Export: trained run -> TorchScript towers in a Triton model repository + FAISS index directory."""
