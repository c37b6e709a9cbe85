"""Integrations: transformers models (apply/remove, generate) and the vLLM plugin's file format."""
