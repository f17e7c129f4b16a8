"""The Self-RAG algorithm as pure Python: no Ray, no vLLM.

- ``tokens``: reflection token strings, groups and id lookup;
- ``prompts``: prompt formats and task templates;
- ``scoring``: retrieval decision and the critique scores from logprobs;
- ``selection``: answer selection and post-processing;
- ``longform``: long-form tree decoding over segments, as a step-wise state machine.
"""
