"""Pruning methods: one short recipe per paper, composed of a scorer, an allocator and the surgery."""
