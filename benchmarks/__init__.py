"""Benchmarks: each script measures one ratio and writes results/<name>.{json,md}; ``python -m benchmarks`` runs
them all and writes results/benchmarks.md (see benchmarks/__main__.py)."""


def run_main(main) -> None:
    """A benchmark's command line: its exit code, or one error line (exit 2) for a bad input such as a missing model."""
    import sys

    from pruning.errors import PruningError

    try:
        sys.exit(main())
    except PruningError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
