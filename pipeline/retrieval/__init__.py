"""Dense retrieval: query/passage encoder, FAISS index, memory-mapped passage store."""
