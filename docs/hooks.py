"""MkDocs hooks (mkdocs.yml ``hooks:``): pages built from the repository instead of copied into docs/.

- API reference: one page per package, generated from the module list in mkdocs.yml (``extra.api_modules``), each
  page a ``::: module`` block per module (mkdocstrings renders the docstrings). A module that moves is renamed in
  that one list; a name that no longer imports fails the strict build.
- Results: ``results/*.md`` and ``results/*.png`` are served as they are in the repository under ``results/``, so the
  docs link to the committed tables instead of copying their numbers. ``results/README.md`` becomes
  ``results/folder.md`` (a README would claim the ``results/`` index, which is docs/results.md). Markdown in
  sub-folders is served too (outside the nav), so a link from a results page into a sub-folder resolves on the site
  as it does in the repository.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
API_SECTION = "API reference"
RESULTS_SECTION = "Results"


def _api_pages(modules: list[str]) -> OrderedDict[str, list[str]]:
    """Modules grouped by page: a package and its submodules (``pruning.methods.flap`` -> ``pruning.methods``);
    a top-level module of a package gets its own page (``pruning.data``)."""
    pages: OrderedDict[str, list[str]] = OrderedDict()
    for name in modules:
        parts = name.split(".")
        page = ".".join(parts[:2])
        pages.setdefault(page, []).append(name)
    return pages


def _result_files() -> list[tuple[Path, str]]:
    """(file in results/, its address in the site)."""
    results = REPO / "results"
    return [
        (path, "results/folder.md" if path.name == "README.md" else f"results/{path.name}")
        for path in sorted(results.glob("*.md")) + sorted(results.glob("*.png"))
    ]


def _nested_result_pages() -> list[tuple[Path, str]]:
    """Markdown in sub-folders of results/, at its repository path (served, not in the nav)."""
    results = REPO / "results"
    return [(path, f"results/{path.relative_to(results).as_posix()}") for path in sorted(results.glob("*/**/*.md"))]


def _extend_section(nav: list, title: str, children: list) -> None:
    """Turn the nav entry ``{title: intro.md}`` into ``{title: [intro.md, *children]}``."""
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and title in entry and isinstance(entry[title], str):
            nav[i] = {title: [entry[title], *children]}
            return
    raise ValueError(f"mkdocs.yml: the nav needs a top-level {title!r} entry with one page for the generated pages")


def on_config(config):
    pages = _api_pages(config.extra.get("api_modules", []))
    _extend_section(config.nav, API_SECTION, [{page: f"reference/{page}.md"} for page in pages])
    _extend_section(
        config.nav,
        RESULTS_SECTION,
        [
            {"results/ folder" if uri.endswith("folder.md") else path.stem: uri}
            for path, uri in _result_files()
            if path.suffix == ".md"
        ],
    )
    return config


def on_files(files, config):
    pages = _api_pages(config.extra.get("api_modules", []))
    for page, modules in pages.items():
        body = [f"# `{page}`", ""]
        for name in modules:
            body += [f"::: {name}", ""]
        files.append(File.generated(config, f"reference/{page}.md", content="\n".join(body)))
    for path, uri in _result_files() + _nested_result_pages():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
