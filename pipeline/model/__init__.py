"""The model's plumbing: its tokenizer (and the reflection-token spec the stages need), and
vLLM's engine arguments with a synchronous engine for the benchmarks and tests."""
