"""The HTML report from a store of real cells: structure, empty/partial stores, and rendering in headless Chromium."""

from __future__ import annotations

import base64
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from experiments import report as R
from experiments.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
W = 4
SMALL = ["eval=quick", f"eval.ppl.0.max_windows={W}", f"eval.ppl.1.max_windows={W}"]
IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from hydra import compose, initialize_config_dir

    from experiments.cell import run_cell

    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        mp.setenv("PRUNING_CACHE", str(root / "cache"))
        for overrides in (
            ["method=dense"],
            ["method=magnitude", "pruning.ratio=0.2"],
            ["method=magnitude", "pruning.ratio=0.4"],
            ["method=random", "pruning.ratio=0.2"],
            ["method=random", "pruning.ratio=0.4", "method.structures=[block]"],
        ):
            run_cell(compose("config", overrides=[f"store.dir={root / 'store'}", "progress=false", *SMALL, *overrides]))
    return root / "store"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_has_titled_plots_and_tables(store, tmp_path):
    records = ResultsStore(store).records()
    page, n = R.render(records, str(store))
    imgs = IMG_RE.findall(page)
    # PPL vs ratio, kept widths, efficiency vs quality: one figure each for the one model (no zero-shot yet)
    assert n == len(imgs) == 3 and f'data-plots="{n}"' in page
    for _, b64 in imgs:
        w, h = _png_size(base64.b64decode(b64))
        assert w > 300 and h > 200
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert any(f"ppl128-lp:wikitext2:test[:{W} windows]" in c for c in captions)  # titled with the protocol
    assert "No data for this section" in page  # zero-shot section
    assert "LLM-Pruner Table 1" in page and "published (A1)" in page and '<tr class="pub">' in page
    assert page.count("<h2>") == 6 and "document.body.dataset.rendered" in page
    # every method label of the store is in the header line
    methods = {r["plan"]["meta"]["method"] for r in records}
    assert all(m in page for m in methods)


def test_empty_partial_and_damaged_stores_give_a_report(store, tmp_path):
    out, n = R.write_report(tmp_path / "nothing", tmp_path / "empty.html")
    text = out.read_text()
    assert n == 0 and "No records in this store yet" in text and text.rstrip().endswith("</html>")
    # only the dense record, plus one unreadable file: still a report (the damaged file is skipped with a warning)
    part = tmp_path / "partial"
    dense = [r for r in ResultsStore(store).records() if r["plan"]["meta"]["method"] == "dense"]
    ResultsStore(part).write(dense[0])
    (part / "records" / "0000broken.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="0000broken"):
        out, n = R.write_report(part, tmp_path / "partial.html")
    text = out.read_text()
    assert n == len(IMG_RE.findall(text)) >= 1 and "could not plot" not in text


def _chromium_dom(html: Path) -> str:
    exe = R.find_chromium()
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run(
            [
                exe,
                *R.CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                html.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.slow  # a headless browser; the fast tier checks the page's HTML above
@pytest.mark.skipif(R.find_chromium() is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(store, tmp_path):
    out, n = R.write_report(store, tmp_path / "report.html")
    dom = _chromium_dom(out)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    rendered = re.search(r'data-rendered="(\d+)"', body)
    assert rendered is not None, body
    assert int(rendered.group(1)) == n > 0
    # and the empty report renders too, with nothing to decode
    empty, _ = R.write_report(tmp_path / "none", tmp_path / "empty.html")
    assert 'data-rendered="0"' in _chromium_dom(empty)
