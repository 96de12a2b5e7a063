"""Inference algorithms (week 9): sampling rules, generation with a static KV cache, speculative decoding."""
