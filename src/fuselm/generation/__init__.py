"""Decoding: one loop for every sequence (decoder.py), prompts, sampling, logits processors, events."""
