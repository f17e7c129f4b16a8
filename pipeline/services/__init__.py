"""Services the stages call through Ray Serve: the engine (vLLM) and the retriever."""
