"""Evaluation: perplexity under named protocols (METHODS.md §1.4); every result carries its protocol."""
