"""KServe retriever: request -> Triton (user/item tower) -> FAISS -> ranked articles with metadata."""
