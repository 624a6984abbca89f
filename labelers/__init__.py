"""AI-feedback scorers: one module per scorer, the shared protocol in `base`, names in `registry`."""

from labelers.base import Scorer
from labelers.registry import SCORERS, build_scorer, parse_weights, scorer_class, scorer_names

__all__ = ["SCORERS", "Scorer", "build_scorer", "parse_weights", "scorer_class", "scorer_names"]
