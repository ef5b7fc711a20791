"""Serve personas: one base model with many LoRA adapters behind an OpenAI-compatible API
and a web chat (``personatune serve``)."""
