"""AI-feedback scorers: one module per scorer, the shared protocol in `base`, names in `registry`."""

from labelers.base import BaseScorer, Scorer
from labelers.registry import (
    ENTRY_POINT_GROUP,
    SCORERS,
    available_scorers,
    build_scorer,
    parse_weights,
    scorer_class,
    scorer_names,
)

__all__ = ["ENTRY_POINT_GROUP", "SCORERS", "BaseScorer", "Scorer", "available_scorers", "build_scorer",
           "parse_weights", "scorer_class", "scorer_names"]
