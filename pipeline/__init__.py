"""Distil a Llama-family chat model into hybrid attention/Mamba models (Mamba in the Llama).

Importing :mod:`pipeline` registers the hybrid model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` loads any checkpoint this pipeline writes.
"""

__version__ = "0.1.0"

import pipeline.models  # noqa: E402,F401  (registers the hybrid with the Auto classes)
