"""Classic models, the yardstick every LLM result is read against: ``classic:logreg|lgbm|cnn|lstm``.

Each is trained on the train items of the same dataset the LLM is evaluated on, sees the same
numeric window the prompt encodes plus the ``atm.market.features`` indicators, and answers the same
verify items with class probabilities (see ``core.py`` for the protocol: embargoed validation tail,
balanced class weights, per-symbol thresholds tuned on validation only, artifacts with config and
versions).

``--model classic:lgbm`` trains (or reuses an identical artifact under ``runs/classic/``);
``--model classic:lgbm@runs/classic/lgbm-1a2b3c4d5e`` loads a saved one and trains nothing.
This module stays light: scikit-learn, LightGBM and torch are imported only when a model is used.
"""

from __future__ import annotations

from typing import Any

_CORE = ("MODELS", "ClassicConfig", "FittedClassic", "fit_classic", "load_classic", "train_classic",
         "walk_forward_eval", "walk_forward_table")
__all__ = ["ClassicProvider", "MODELS", "ClassicConfig", "FittedClassic", "fit_classic", "load_classic",
           "train_classic", "walk_forward_eval", "walk_forward_table"]  # literal: tools read it statically


def __getattr__(name: str) -> Any:  # pandas, pydantic models and the provider load on first use
    if name == "ClassicProvider":
        from atm.eval.classic.provider import ClassicProvider

        return ClassicProvider
    if name in _CORE:
        from atm.eval.classic import core

        return getattr(core, name)
    raise AttributeError(f"module 'atm.eval.classic' has no attribute {name!r}")
