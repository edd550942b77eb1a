"""The LLM backends of ``atm-eval``, one module per way of running a model (as lm-eval lays out
its models): ``openai`` (any OpenAI-compatible server), ``ollama``, ``atm`` (a registry GGUF in
process or on llama-server), ``hf`` (transformers) and ``vllm`` (a vLLM started for the run).
Each is loaded by name from ``atm.eval.providers.REGISTRY``; what they share (``Transient``, the
retry loop, ``RequestProvider``, ``GenerationSpec``, the answer contract) lives in
``atm.eval.providers``.
"""
