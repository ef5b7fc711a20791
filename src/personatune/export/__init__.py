"""Export a persona for use outside personatune.

- :mod:`.merged`: a plain transformers model (the adapter merged in), pushed to the Hub
  on request;
- :mod:`.gguf_file`: GGUF files for llama.cpp, Ollama and LM Studio (merged, or the
  adapter as a llama.cpp LoRA adapter), with the tokenizer, chat template and end-of-turn
  tokens in the metadata;
- :mod:`.modelfile`: the Ollama Modelfile beside them (system prompt, the chat template as
  a Go template, stop strings).
"""

from personatune.export.merged import check_hub, export_merged, push_to_hub

__all__ = ["check_hub", "export_merged", "push_to_hub"]
