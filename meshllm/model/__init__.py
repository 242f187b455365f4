"""Model import, graph partitioning, segment runtime, tokenizer and sampling."""

PRECISIONS = ("int4", "fp32")
