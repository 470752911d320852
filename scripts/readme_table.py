"""Copies the smollm2_135m block of results/ratio_sweep_summary.md into README.md between the README-TABLE markers,
so the README's one table is always the committed summary, never typed by hand.

    python scripts/readme_table.py [--check]     # --check: exit 1 if README.md differs from the summary
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN = (
    "<!-- README-TABLE begin: the smollm2_135m block of results/ratio_sweep_summary.md (scripts/readme_table.py) -->"
)
END = "<!-- README-TABLE end -->"


def smollm2_block(summary: str) -> str:
    start = summary.index("**smollm2_135m**")
    nxt = summary.find("\n**", start + 2)
    return summary[start : nxt if nxt != -1 else len(summary)].strip()


def render(readme: str, summary: str) -> str:
    pattern = re.compile(r"<!-- README-TABLE begin.*?-->.*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit("README.md has no README-TABLE markers")
    return pattern.sub(lambda _: f"{BEGIN}\n{smollm2_block(summary)}\n{END}", readme, count=1)


def main(argv: list[str]) -> int:
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    new = render(readme, (REPO / "results" / "ratio_sweep_summary.md").read_text())
    if "--check" in argv:
        return 0 if new == readme else 1
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
