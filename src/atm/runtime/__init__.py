"""What runs models for serve, eval and the benchmarks: one launcher, one loader, one scorer.

- ``net``: ``free_port()``, ``new_api_key()``.
- ``process``: ``EngineProcess``, one engine server process (llama-server, ``vllm serve``) on a
  private 127.0.0.1 port with a fresh random API key, its own process group and a log file; started,
  health-waited and stopped from sync code (eval, benchmarks) or async code (serve).
- ``supervisor``: ``Supervisor``, an ``EngineProcess`` restarted when it dies, with a restart budget
  (``atm serve``'s engines).
- ``llama_server``: the one llama-server command line and ``LlamaServer`` (a started process, for
  eval and the benchmarks); ``vllm``: the ``vllm serve`` command line.
- ``hf``: ``load_causal_lm``, the one transformers loader (the ``hf:`` provider and the transformers
  engine).
- ``llamacpp``: ``LlamaCppRunner``, llama.cpp in process (``atm:`` provider): constrained
  generation and option log-likelihoods behind one small interface.

Nothing here imports ``atm.serve`` or ``atm.eval``: both import this.
"""

from atm.runtime.net import free_port, new_api_key

__all__ = ["free_port", "new_api_key"]
