"""The HTTP API of ``atm serve``, one router per feature (in the style of vLLM's OpenAI server).

- ``protocol``: request models and the strict body reader; ``errors``: error shapes and handlers;
- ``deps``: the served models as a dependency (``ServeState``), request checks, client lifetime;
- ``streaming``: SSE and NDJSON writers; ``metrics``: Prometheus; ``middleware``: key, size, metrics;
- routers: ``openai`` (/v1 chat, completions, models), ``ollama`` (/api), ``advice`` (/v1/advice),
  ``ops`` (/health, /metrics, /).

``atm.serve.app.create_app`` only wires these together.
"""

from atm.serve.api import advice, ollama, openai, ops

ROUTERS = (openai.router, advice.router, ollama.router, ops.router)

__all__ = ["ROUTERS"]
