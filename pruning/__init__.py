"""Structured pruning for LLaMA-family models."""
