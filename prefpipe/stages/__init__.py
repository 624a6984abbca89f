"""The stages: each a function of its input datasets and options, writing one dataset (or report).

generate, label (+ pairs, scoring: the one scoring path), ingest (human preferences), rounds (D3PO's online
loop: generate -> label -> train), eval (compare, report, show). They use core, models, labelers and
trainer; only the CLI imports them.
"""
