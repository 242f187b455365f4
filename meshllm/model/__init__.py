"""Model import, graph partitioning, segment runtime, tokenizer and sampling."""
