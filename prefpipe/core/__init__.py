"""The bottom layer: what every other part of prefpipe uses, importing nothing of ours above it.

errors (the one bad-input exception), schema (the tables), dataset (sharded resumable Parquet, the one
atomic write), images (the one decoder and verifier), devices (the one device/dtype resolver), options (the
one dataclass-to-CLI adapter), prompts, tokenizer (CLIP BPE offline), trajectory (the D3PO latents column),
stats.
"""
