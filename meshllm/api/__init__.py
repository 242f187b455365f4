"""A peer's OpenAI-compatible HTTP API (opt-in: ``[api]`` in config.toml, or
``meshllm daemon --api``): :mod:`~meshllm.api.http` serves HTTP/1.1 on trio with h11,
:mod:`~meshllm.api.openai` answers OpenAI's routes through the serving service."""
