"""The interactive dashboard (issue 25): its data against the store, the reproduce command against Hydra, and the
page driven in headless Chromium with the network off (filter, sort, open a record, hover a point, switch the
heatmap's cell), plus ``--serve`` picking up a record written during the test."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from experiments import dashboard as DB
from experiments import report as R
from experiments import tables as T
from experiments.observations import observations
from experiments.reproduce import hydra_value, reproduce_command
from experiments.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "results" / "store"
# the pre-protocol reference records: several seeds per cell, re-runs, no per-window values
ARCHIVE = REPO / "results" / "archive" / "pre-protocols" / "store"
SMALL = ["eval=quick", "eval.ppl.0.max_windows=4", "eval.ppl.1.max_windows=4", "progress=false", "threads=1"]


def _chromium():
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    return R.find_chromium()


needs_browser = pytest.mark.skipif(_chromium() is None, reason="playwright or a chromium executable is missing")


# ------------------------------------------------------------------------------ data (fast)


def test_one_colour_and_marker_per_method_shared_with_the_report():
    methods = [f"method_{i:02d}" for i in range(24)] + ["dense"]
    styles = DB.method_styles(methods)
    pairs = [(s["color"], s["symbol"]) for m, s in styles.items() if m != "dense"]
    assert len(set(pairs)) == 24  # 15 colours x 11 markers, coprime: no two methods look alike
    colors = R._Colors(methods)  # the static report gives each method the same colour and the same marker
    for m in methods[:-1]:
        color, marker = colors(m)
        assert styles[m] == {"color": color, "symbol": DB.PLOTLY_SYMBOLS[marker]}


def test_hydra_values_round_trip_through_the_override_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in [None, True, 0, 0.2, 1e-05, "AL-AM", "embedded:stories260K", "null", "it's", [1, "a b"], {"k": [0.5]}]:
        (ov,) = parser.parse_overrides([f"++x={hydra_value(value)}"])
        got = ov.value()
        assert got == value or (isinstance(got, dict) and dict(got) == value), (value, got)


def test_data_matches_the_store():
    records = ResultsStore(ARCHIVE).records()
    data = DB.build_data(records, "results/archive/pre-protocols/store", REPO / "results")
    assert data["n_records"] == len(records) == len(data["records"]) and not data["warnings"]
    rec = records[0]
    row = next(r for r in data["records"] if r["hash"] == rec["config_hash"])
    assert row["ppl"] == next(iter(rec["metrics"]["ppl"].values()))["ppl"]
    assert data["details"][rec["config_hash"]]["reproduce"] == reproduce_command(rec)
    assert data["details"][rec["config_hash"]]["timings"] == rec["timings"]
    # a point is the mean of its seeds' values, as the observations hold them
    obs = observations(records)
    pt = next(p for p in data["points"] if p["kind"] == "ppl" and len(p["values"]) > 1)
    sel = obs[(obs["key"] == pt["key"]) & (obs["method"] == pt["method"]) & (obs["model"] == pt["model"])]
    sel = sel[(sel["ratio"] == pt["ratio"]) & (sel["phase"] == pt["phase"])]
    newest = {seed: g.sort_values("created")["value"].iloc[-1] for seed, g in sel.groupby("seed")}  # reruns replace
    assert len(sel) > len(newest) > 1  # this cell was re-run: the newer record of a seed counts, once
    assert sorted(pt["values"]) == sorted(newest.values())
    assert pt["mean"] == pytest.approx(sum(pt["values"]) / len(pt["values"]), rel=1e-12)
    assert pt["ci"] is None  # the archived store predates per-window storage: no interval is made up
    # the widths of a record, by original layer
    cell = data["widths"]["stories260k"]["cells"][0]
    src = next(r for r in records if r["config_hash"] == cell["hash"])
    kept = [w for w in cell["layers"] if w is not None]
    assert [w["intermediate_size"] for w in kept] == [w["intermediate_size"] for w in src["widths"]]
    assert data["benchmarks"] and all("ratio" in b for b in data["benchmarks"])
    assert any(a["kind"] == "ppl" and a["dataset"] == "wikitext2" for a in data["anchors"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert DB.main(["--store", str(tmp_path / "missing"), "--out", str(tmp_path / "d.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--store" in err and "not a directory" in err


# ------------------------------------------------------------------------------ real cells (slow)


def _run_cells(store: Path, cells: list[list[str]]) -> None:
    from hydra import compose, initialize_config_dir

    from experiments.cell import run_cell

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for overrides in cells:
            run_cell(compose("config", overrides=[f"store.dir={store}", *SMALL, *overrides]))


@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory) -> Path:
    """Cells written by today's code (per-window values stored): two seeds of one cell and a FLAP cell."""
    root = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNING_CACHE", str(root / "cache"))
        _run_cells(
            root / "store",
            [["method=random", "pruning.ratio=0.2", "seed=0"], ["method=random", "pruning.ratio=0.2", "seed=1"]]
            + [["method=flap", "pruning.ratio=0.2", "calibration.n_samples=8", "calibration.seq_len=32"]],
        )
    return root / "store"


@pytest.mark.slow
def test_reproduce_command_composes_the_records_config_hash(fresh_store):
    from hydra import compose, initialize_config_dir

    from experiments.cell import cell_config
    from experiments.record import config_hash

    records = ResultsStore(fresh_store).records()
    assert len(records) == 4  # three cells and their shared dense record
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for rec in records:
            argv = shlex.split(reproduce_command(rec))
            assert argv[:2] == ["pruning-lab", "run"]
            cfg = compose("config", overrides=argv[2:])
            assert config_hash(cell_config(cfg, "calibration" in rec["config"])) == rec["config_hash"], argv


@pytest.mark.slow
def test_points_carry_the_tables_layers_interval(fresh_store):
    records = ResultsStore(fresh_store).records()
    data = DB.build_data(records)
    by_hash = {r["config_hash"]: r for r in records}
    pt = next(p for p in data["points"] if p["kind"] == "ppl" and len(p["values"]) == 2 and "wikitext2" in p["key"])
    unit = f"ppl/{pt['key']}"
    iv = T.cell_interval(pt["hashes"], unit, by_hash)
    assert pt["ci"] == [iv.low, iv.high] and iv.low < pt["mean"] < iv.high and pt["ci_n"] == [4]
    assert pt["mean"] == pytest.approx(iv.estimate, rel=1e-12)
    # flap vs random at 20% on the same windows: the tables layer's paired difference, as a PPL ratio
    (pair,) = [p for p in data["paired"] if p["key"] == pt["key"] and p["ratio"] == pt["ratio"]]
    flap = next(p for p in data["points"] if p["key"] == pt["key"] and p["method"] == "flap")
    a, b = (flap, pt) if flap["mean"] < pt["mean"] else (pt, flap)
    want = T.cell_paired(a["hashes"], b["hashes"], unit, by_hash)
    assert (pair["a"], pair["b"]) == (a["method"], b["method"]) and pair["what"] == "PPL a / b"
    assert (pair["estimate"], pair["low"], pair["high"]) == (want.ratio.estimate, want.ratio.low, want.ratio.high)
    assert pair["estimate"] == pytest.approx(a["mean"] / b["mean"], rel=1e-12) and pair["resolved"] == want.resolved
    assert all("_unit" not in p for p in data["points"])


# ------------------------------------------------------------------------------ the page in Chromium (slow)


class Browser:
    """Headless Chromium via playwright with every request outside the page's own origin refused and counted."""

    def __init__(self, allow: str = "file://"):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        self.context = self.browser.new_context(viewport={"width": 1400, "height": 1000}, offline=allow == "file://")
        self.blocked: list[str] = []
        self.errors: list[str] = []

        def route(r):
            if r.request.url.startswith(allow) or r.request.url.startswith("data:"):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()

        self.context.route("**/*", route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def close(self):
        self.browser.close()
        self._pw.stop()


def _hover_point(page, div: str, trace_name: str, index: int) -> str:
    """Move the real mouse over one marker of a trace and return the tooltip's text."""
    pos = page.evaluate(
        """([div, name, i]) => {
            const gd = document.getElementById(div), L = gd._fullLayout;
            const t = gd.data.findIndex(d => d.name === name);
            const x = gd.data[t].x[i], y = gd.data[t].y[i];
            const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
            return [box.left + L.xaxis.d2p(x), box.top + L.yaxis.d2p(y)];
        }""",
        [div, trace_name, index],
    )
    page.mouse.move(pos[0] - 30, pos[1] - 30)
    page.mouse.move(pos[0], pos[1], steps=5)
    page.wait_for_selector(f"#{div} .hoverlayer .hovertext", timeout=10000)
    return page.evaluate(  # SVG: the tooltip's lines are <tspan>s of its <text>
        f"() => Array.from(document.querySelectorAll('#{div} .hoverlayer .hovertext tspan')).map(t => t.textContent)"
        ".join('\\n')"
    )


@pytest.mark.slow
@needs_browser
def test_dashboard_of_the_results_store_in_chromium_offline(tmp_path):
    records = ResultsStore(STORE).records()
    out = DB.write_dashboard(STORE, tmp_path / "dashboard.html")
    b = Browser()
    try:
        page = b.page
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=60000)
        assert page.inner_text("#count") == f"{len(records)} of {len(records)} records"
        # filter to one model and one protocol
        model, protocol = "stories260k", "ppl128-lp:wikitext2:test[:32 windows]"
        want = [
            r for r in records if r["config"]["model"]["name"] == model and next(iter(r["metrics"]["ppl"])) == protocol
        ]
        page.select_option("#f-model", model)
        page.select_option("#f-protocol", protocol)
        rows = page.locator("#records tbody tr")
        assert rows.count() == len(want) > 3
        cells = page.eval_on_selector_all(
            "#records tbody tr", "rs => rs.map(r => [r.cells[0].innerText, r.cells[4].innerText])"
        )
        assert {tuple(c) for c in cells} == {(model, protocol)}
        # sort by PPL: ascending, then descending
        page.click("#records th[data-key='ppl']")
        ppl = [
            float(t) for t in page.eval_on_selector_all("#records tbody tr", "rs => rs.map(r => r.cells[5].innerText)")
        ]
        assert ppl == sorted(ppl) and ppl[0] == pytest.approx(
            min(r["metrics"]["ppl"][protocol]["ppl"] for r in want), abs=0.005
        )
        page.click("#records th[data-key='ppl']")
        ppl_desc = [
            float(t) for t in page.eval_on_selector_all("#records tbody tr", "rs => rs.map(r => r.cells[5].innerText)")
        ]
        assert ppl_desc == sorted(ppl, reverse=True)
        # open the best record: config, plan, timings, versions and the command that reproduces it
        page.click("#records th[data-key='ppl']")
        rows.first.click()
        page.wait_for_selector("#detail.open")
        best = min(want, key=lambda r: r["metrics"]["ppl"][protocol]["ppl"])
        assert page.inner_text("#reproduce") == reproduce_command(best)
        assert json.loads(page.inner_text("#detail-config pre")) == best["config"]
        assert json.loads(page.inner_text("#detail-timings pre")) == best["timings"]
        assert json.loads(page.inner_text("#detail-versions pre"))["torch"] == best["versions"]["torch"]
        page.click("#detail-close")
        # hover a point of the PPL plot and read its tooltip
        page.click("#tab-quality")
        page.select_option("#q-model", model)
        page.select_option("#q-ppl", protocol)
        page.wait_for_function("document.getElementById('plot-ppl').data !== undefined")
        trace = page.evaluate(
            "() => document.getElementById('plot-ppl').data.find("
            "d => d.mode === 'lines+markers' && d.name.split(' [')[0] === 'flap')"
        )  # "flap", or "flap [<differing config>]" when the store holds FLAP cells of several calibrations
        assert trace is not None
        # isolate FLAP as a user would by double-clicking its legend entry (other methods' points can sit on top)
        page.evaluate(
            """(name) => { const gd = document.getElementById('plot-ppl');
                const others = gd.data.map((d, j) => d.name === name ? -1 : j).filter(j => j >= 0);
                return Plotly.restyle(gd, {visible: 'legendonly'}, others); }""",
            trace["name"],
        )
        i = 0
        tip = _hover_point(page, "plot-ppl", trace["name"], i)
        # the tooltip names its records: FLAP cells of this model and protocol, each seed's PPL printed
        by_hash = {r["config_hash"]: r for r in records}
        named = [by_hash[h] for h in tip.split("record ", 1)[1].split()]
        assert named and all(r["plan"]["meta"].get("method") == "flap" for r in named)
        assert all(r["config"]["model"]["name"] == model for r in named)
        assert all(f"{r['metrics']['ppl'][protocol]['ppl']:.2f}" in tip for r in named), tip
        assert f"{trace['y'][i]:.2f}" in tip
        # switch the heatmap's right cell; the two cells stand side by side
        page.click("#tab-widths")
        page.select_option("#w-model", model)
        options = page.eval_on_selector_all("#w-right option", "os => os.map(o => o.value)")
        target = options[-1]
        page.select_option("#w-right", target)
        page.wait_for_function(f"document.getElementById('heat-right').layout.title.text.includes('{target}')")
        z = page.evaluate("() => document.getElementById('heat-right').data[0].z")
        rec = next(r for r in records if r["config_hash"] == target)
        kept = [row for row in z if row[0] != 0 or row[1] != 0]
        assert len(z) == len(rec["widths"]) + len(rec["plan"].get("blocks") or [])
        assert len(kept) == len(rec["widths"])
        left = page.evaluate("() => document.getElementById('heat-left').layout.title.text")
        assert target not in left or len(options) == 1
        for tab in ("tables", "bench", "sweep"):
            page.click(f"#tab-{tab}")
        assert page.locator(".paper-table").count() >= 1 and page.locator("#bench-table tbody tr").count() > 5
        assert b.errors == [] and b.blocked == []
    finally:
        b.close()


@pytest.mark.slow
@needs_browser
def test_served_dashboard_shows_a_record_written_during_the_test(tmp_path, monkeypatch):
    """The page is open before the cell runs; the cell's record appears without restarting anything."""
    store = tmp_path / "store"
    src = ResultsStore(STORE)
    dst = ResultsStore(store)
    for rec in src.records()[:3]:
        dst.write(rec)
    server = DB.DashboardServer(store, tmp_path / "dashboard.html", port=0, interval=0.2).start()
    b = Browser(allow=server.url)
    try:
        page = b.page
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']", timeout=60000)
        assert page.inner_text("#count") == "3 of 3 records"
        page.select_option("#f-recovery", "none")  # a filter: kept across the reload
        monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
        _run_cells(store, [["method=random", "pruning.ratio=0.3", "method.structures=[mlp]"]])
        page.wait_for_function("document.getElementById('count').innerText.endsWith('of 5 records')", timeout=60000)
        assert page.input_value("#f-recovery") == "none" and server.version >= 2
        new = [r for r in ResultsStore(store).records() if r["config"]["method"].get("structures") == ["mlp"]]
        assert len(new) == 1 and page.locator(f"#records tr[data-hash='{new[0]['config_hash']}']").count() == 1
        assert b.errors == [] and b.blocked == [] and server.errors == []
    finally:
        b.close()
        server.stop()


def test_pruning_lab_lists_the_dashboard_command():
    from pruning_lab.cli import COMMANDS

    assert COMMANDS["dashboard"][0] == "experiments.dashboard:main"


def test_page_is_self_contained(tmp_path):
    """No script, stylesheet or image is fetched from anywhere: everything is inline."""
    (tmp_path / "store" / "records").mkdir(parents=True)
    for path in sorted((STORE / "records").glob("*.json"))[:10]:
        shutil.copy(path, tmp_path / "store" / "records" / path.name)
    out = DB.write_dashboard(tmp_path / "store", tmp_path / "d.html", results_dir=REPO / "results")
    text = out.read_text(encoding="utf-8")
    assert "Plotly" in text and text.count("<script") == 3
    head, _, rest = text.partition("<script>")  # plotly.js itself holds link texts (its logo, map credits): cut
    text = head + rest.partition("</script>")[2]  # the browser tests check that nothing is requested
    for pattern in ('src="http', "src='http", 'href="http', "@import", "<link "):
        assert pattern not in text, pattern


@pytest.mark.slow
def test_sweep_progress_from_a_multirun_directory(fresh_store, tmp_path):
    """A sweep folder as Hydra writes it (multirun.yaml, <job>/.hydra/config.yaml + overrides.yaml): job 0's cell
    is in the store, job 1 failed (its submitit .err has the error line), job 2 is writing, job 3 not started."""
    import os
    import time

    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    grid = ["method=random,flap", "pruning.ratio=0.2,0.3", "seed=0"]
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": grid}}}))
    jobs = [
        ["method=random", "pruning.ratio=0.2"],
        ["method=random", "pruning.ratio=0.3"],
        ["method=flap", "pruning.ratio=0.2"],
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for i, ov in enumerate(jobs):
            extra = ["calibration.n_samples=4", "calibration.seq_len=32"] if "flap" in ov[0] else []  # not run
            cfg = compose("config", overrides=[f"store.dir={fresh_store}", *SMALL, *ov, "seed=0", *extra])
            (root / str(i) / ".hydra").mkdir(parents=True)
            OmegaConf.save(cfg, root / str(i) / ".hydra" / "config.yaml")
            (root / str(i) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*ov, "seed=0"]))
            (root / str(i) / "run.log").write_text("")
    (root / ".submitit" / "77").mkdir(parents=True)
    (root / ".submitit" / "77" / "77_1_log.err").write_text("progress...\nerror: method.structures: bad value\n")
    old = time.time() - 600
    for i in (0, 1):
        os.utime(root / str(i) / "run.log", (old, old))
    data = DB.build_data(ResultsStore(fresh_store).records(), sweep_dirs=[root])
    state = {j["job"]: (j["state"], j["reason"]) for j in data["sweep"]}
    done = next(
        r
        for r in ResultsStore(fresh_store).records()
        if r["config"]["method"]["_target_"].endswith("random") and r["config"]["seed"] == 0
    )
    assert state[0] == ("done", f"record {done['config_hash']}")
    assert state[1] == ("failed", "error: method.structures: bad value")
    assert state[2] == ("running", "")  # its log was just written, and its cell is not in the store
    assert state[3][0] == "pending" and data["sweep"][3]["overrides"] == "method=flap pruning.ratio=0.3"
    assert {j["shared"] for j in data["sweep"]} == {"seed=0"}  # set by every job: shown once above the table


@pytest.mark.slow
def test_macs_and_latency_axes_come_from_the_efficiency_block(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    eff = "+eval.efficiency={seq_len:16,decode_tokens:4,warmup:1,repeats:3,measure:true}"
    _run_cells(tmp_path / "store", [["method=random", f"pruning.ratio={r}", eff] for r in (0.2, 0.4)])
    records = ResultsStore(tmp_path / "store").records()
    data = DB.build_data(records)
    pts = [p for p in data["points"] if p["kind"] == "ppl" and p["phase"] == "pruned"]
    assert len(pts) == 4  # two ratios x two PPL protocols
    for p in pts:
        (rec,) = [r for r in records if r["config_hash"] == p["hashes"][0]]
        block = rec["metrics"]["efficiency"]
        assert p["macs"] == block["macs_per_token"] and p["macs_metric"] == "macs_per_token"
        assert p["latency"] == block["prefill_latency_s"]["median"] > 0
    assert len({p["macs"] for p in pts}) == 2  # fewer MACs at 40% than at 20%


def test_sweep_progress_reads_outcomes_and_heartbeats(tmp_path):
    """A failed cell's outcome file gives its reason even when its stdout was not kept (joblib); a cell whose
    heartbeat is fresh is running, one whose heartbeat stopped is stopped."""
    import json
    import os
    import time

    import yaml

    from experiments.sweeps import HEARTBEAT, OUTCOMES_DIR, heartbeat

    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["seed=0,1,2"]}}}))
    old = time.time() - 600
    for i in range(3):
        (root / str(i) / ".hydra").mkdir(parents=True)
        (root / str(i) / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": i}))
        (root / str(i) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={i}"]))
        for p in (root / str(i)).rglob("*"):
            os.utime(p, (old, old))
    (root / OUTCOMES_DIR).mkdir()
    detail = "error: calibration: 'c4' gives only 3 of 128 documents"
    (root / OUTCOMES_DIR / "0.json").write_text(json.dumps({"num": 0, "status": "failed", "detail": detail}))

    def states():
        return [(j["state"], j["reason"]) for j in DB.build_data([], sweep_dirs=[root])["sweep"]]

    with heartbeat(root / "1", every=0.05) as beat:
        time.sleep(0.2)
        assert beat.is_file() and time.time() - beat.stat().st_mtime < 1
        got = states()
        assert got[0] == ("failed", detail)
        assert got[1] == ("running", "")
        assert got[2][0] == "stopped" and "heartbeat" in got[2][1]
    assert not (root / "1" / HEARTBEAT).exists()  # the cell ended: no heartbeat left behind
    assert states()[1][0] == "stopped"
