"""Benchmarks: each script measures one ratio and writes results/<name>.{json,md}; ``python -m benchmarks`` runs
them all and writes results/benchmarks.md (see benchmarks/__main__.py)."""
