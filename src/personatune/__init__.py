"""personatune: give a chat LLM a persona with LoRA/QLoRA, without losing what it knew."""

__version__ = "0.1.0"
