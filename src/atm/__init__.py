"""ATM: can a small fine-tuned LLM give useful market advice?

Stages (one subpackage each): ``market`` (klines, features, labels, splits), ``prompting``
(encoders, templates, advice schema, preference pairs), ``finetune`` (base models, SFT, ORPO,
DAPO, merge), ``export`` (GGUF, quantize, registry, Modelfiles), ``serve`` (engines, API,
Gradio chat) and ``eval`` (harness, metrics, baselines, classic models, backtest, reports).
"""

import logging

__version__ = "0.1.0"

# Quiet in library use: records go nowhere until the CLI (atm.logs.configure) or the embedding
# application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
