"""Integrations with model libraries: `scaled_rope.integrations.transformers` (needs transformers)."""
