"""Zero-shot through lm-eval on the local data: task definitions against the installed harness and the raw files,
lm-eval's choices against a plain log-likelihood computation with the real stories260K, in-memory vs reloaded."""

from __future__ import annotations

import bz2
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import STORIES, cli_run, hydra_app_in_process
from experiments.persample import digest, doc_values
from pruning import data
from pruning.errors import DataError, PruningError
from pruning.eval import check_eval
from pruning.eval import zeroshot as Z
from pruning.eval.tasks import TASKS, utils

REPO = Path(__file__).resolve().parents[1]
ZS = "zeroshot"


pytestmark = pytest.mark.usefixtures("one_thread")
# METHODS.md §1.5 table
COUNTS = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}


def root() -> Path:
    r = data.data_root()
    if r is None or not (r / ZS).is_dir():
        pytest.skip("the zero-shot data root (../shared/data/zeroshot) is not available")
    return r / ZS


def raw_count(name: str) -> int:
    """Documents in the release file, counted without pruning's loaders."""
    r = root()
    if name == "boolq":
        return sum(1 for line in open(r / "boolq/val.jsonl", encoding="utf-8") if line.strip())
    if name == "piqa":
        return sum(1 for line in open(r / "piqa/valid.jsonl", encoding="utf-8") if line.strip())
    if name == "hellaswag":
        return bz2.open(r / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().count("\n") // 6
    if name == "winogrande":
        return len(json.load(open(r / "winogrande/dev_llm-adapters-format.json", encoding="utf-8")))
    if name in ("arc_easy", "arc_challenge"):
        f = "ARC-Easy-Test.jsonl" if name == "arc_easy" else "ARC-Challenge-Test.jsonl"
        return sum(1 for line in open(r / "arc" / f, encoding="utf-8") if line.strip())
    if name == "openbookqa":
        return sum(1 for line in open(r / "openbookqa/test.tsv", encoding="utf-8") if line.strip()) - 1
    raise AssertionError(name)


def docs(name: str) -> list[dict]:
    root()
    return TASKS[name].loader(Z.task_files(name))


@pytest.mark.parametrize("name", list(COUNTS))
def test_document_count_equals_data_file(name):
    assert len(docs(name)) == raw_count(name) == COUNTS[name] == TASKS[name].n_docs


# ------------------------------------------------------------------------------ definitions vs installed lm-eval


def installed(name: str) -> dict:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / TASKS[name].yaml)


@pytest.mark.parametrize("name", list(COUNTS))
def test_prompts_are_the_installed_harness_definitions(name):
    """Same output type, evaluated split, prompt/choice/target fields; function fields give identical output."""
    root()
    ref, ours = installed(name), TASKS[name].config(Z.task_files(name))
    assert ref["task"] == name and ref["output_type"] == ours["output_type"] == "multiple_choice"
    evaluated = "test" if ref.get("test_split") else "validation"
    assert TASKS[name].split == evaluated and ours[f"{evaluated}_split"] == ref[f"{evaluated}_split"]
    assert ref.get("target_delimiter", " ") == ours.get("target_delimiter", " ") == " "
    assert ours.get("num_fewshot", 0) == ref.get("num_fewshot", 0) == 0
    ref_metrics = [m["metric"] for m in ref["metric_list"]]
    assert set(ref_metrics) <= set(TASKS[name].metrics)
    sample = docs(name)[:200]
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs"):
        if not callable(ref.get(key)):
            assert ours.get(key) == ref.get(key), key
    if callable(ref.get("process_docs")):  # HellaSwag: our copy of lm-eval's process_docs, same output
        import datasets

        ds = datasets.Dataset.from_list(sample)
        assert ours["process_docs"](ds).to_list() == ref["process_docs"](ds).to_list()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if callable(ref.get(key)):  # WinoGrande's partial-evaluation functions
            assert [ours[key](d) for d in sample] == [ref[key](d) for d in sample], key


def test_winogrande_partial_scoring_round_trip():
    d = docs("winogrande")[0]
    assert d == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    assert utils.winogrande_doc_to_choice(d) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert utils.winogrande_doc_to_target(d) == "always got the easier cases."
    assert utils.winogrande_doc_to_text(d) == 1  # the gold *context*
    labels = (root() / "winogrande/dev-labels.lst").read_text().split()
    assert [r["answer"] for r in docs("winogrande")] == labels


def test_hellaswag_reconstruction():
    """ctx_a/ctx_b split back out losslessly; lm-eval's capitalisation applies to ActivityNet fragments only."""
    rows = docs("hellaswag")
    with bz2.open(root() / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    for k, r in enumerate(rows):
        assert f"{r['activity_label']}: {r['ctx']}" == lines[6 * k]
        assert r["endings"] == lines[6 * k + 2 : 6 * k + 6] and r["label"] == lines[6 * k + 1]
    wikihow = [r for r in rows if r["activity_label"] in utils.WIKIHOW_CATEGORIES]
    assert (len(wikihow), len(rows) - len(wikihow)) == (6799, 3243)  # HellaSwag val: WikiHow / ActivityNet
    assert all(r["ctx_b"] == "" for r in wikihow)
    assert sum(bool(r["ctx_b"]) for r in rows) == 3236
    q = utils.process_docs(__import__("datasets").Dataset.from_list(rows[:2])).to_list()
    assert q[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He" and q[0]["gold"] == 3
    assert q[1]["query"] == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"


def test_openbookqa_and_arc_rows():
    o = docs("openbookqa")[0]
    assert o["id"] == "8-343" and o["answerKey"] == "B" and o["choices"]["label"] == list("ABCD")
    assert o["choices"]["text"][1] == "quit eating lunch out"
    a = docs("arc_challenge")[0]
    assert (
        a["id"] == "Mercury_7175875"
        and a["choices"]["text"][a["choices"]["label"].index(a["answerKey"])] == "Planetary days will become shorter."
    )
    b = docs("boolq")[0]
    assert b["label"] == 0 and b["passage"].startswith("Ethanol fuel -- ")


# ------------------------------------------------------------------------------ config validation


def test_config_errors_before_any_model():
    with pytest.raises(PruningError, match=r"unknown task.*choices: boolq"):
        Z.check_zeroshot({"tasks": ["arc_easyy"]})
    with pytest.raises(PruningError, match="metric_preset"):
        Z.check_zeroshot({"metric_preset": "llm-pruner"})
    with pytest.raises(PruningError, match="none of them is in tasks"):
        Z.check_zeroshot({"tasks": ["boolq", "openbookqa"], "metric_preset": "slicegpt"})
    with pytest.raises(PruningError, match="num_fewshot must be 0"):
        Z.check_zeroshot({"num_fewshot": 5})
    with pytest.raises(PruningError, match="limit"):
        Z.check_zeroshot({"limit": 0})
    with pytest.raises(PruningError, match="unknown keys \\['shots'\\]"):
        Z.check_zeroshot({"shots": 0})
    with pytest.raises(PruningError, match="unknown task"):
        check_eval(OmegaConf.create({"zeroshot": {"tasks": ["mmlu"]}}))


def test_missing_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    src = root()
    (tmp_path / ZS / "piqa").mkdir(parents=True)
    shutil.copy(src / "piqa/valid.jsonl", tmp_path / ZS / "piqa/valid.jsonl")  # labels file missing
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"zero-shot task 'piqa'.*not found: .*zeroshot/piqa/valid-labels\.lst"):
        check_eval(OmegaConf.create({"zeroshot": {"tasks": ["piqa"]}}))
    with pytest.raises(DataError, match=r"zeroshot/boolq/val\.jsonl"):
        check_eval(OmegaConf.create({"zeroshot": {}}))  # an empty block = the 7 tasks


# ------------------------------------------------------------------------------ known answers with the real model


def plain_loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context): whole string tokenised, the context's tokens split off."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    assert whole[: len(ctx)] == ctx
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def first_lines(path: Path, k: int) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return fh.readlines()[:k]


def raw_requests(name: str, k: int) -> list[tuple[list[tuple[str, str]], int, list[str]]]:
    """(requests, gold, choices) for the first k docs, built from the raw files with lm-eval's published prompts."""
    r = root()
    out = []
    if name == "arc_easy":
        for line in first_lines(r / "arc/ARC-Easy-Test.jsonl", k):
            j = json.loads(line)
            ch = j["question"]["choices"]
            texts = [c["text"] for c in ch]
            ctx = f"Question: {j['question']['stem']}\nAnswer:"
            out.append(([(ctx, " " + t) for t in texts], [c["label"] for c in ch].index(j["answerKey"]), texts))
    elif name == "piqa":
        labels = (r / "piqa/valid-labels.lst").read_text().split()
        for line, y in zip(first_lines(r / "piqa/valid.jsonl", k), labels):
            j = json.loads(line)
            texts = [j["sol1"], j["sol2"]]
            out.append(([(f"Question: {j['goal']}\nAnswer:", " " + t) for t in texts], int(y), texts))
    elif name == "boolq":
        for line in first_lines(r / "boolq/val.jsonl", k):
            j = json.loads(line)
            ctx = f"{j['passage']}\nQuestion: {j['question']}?\nAnswer:"
            out.append(([(ctx, " no"), (ctx, " yes")], int(str(j["label"]).lower() == "true"), ["no", "yes"]))
    elif name == "winogrande":
        items = json.loads((r / "winogrande/dev_llm-adapters-format.json").read_text(encoding="utf-8"))[:k]
        for it in items:
            body = it["instruction"].split("sentence: ", 1)[1]
            sentence, opts = body.split("\n\nOption1: ")
            o1, rest = opts.split(" Option2: ")
            o2 = rest.split(" Answer format:")[0]
            i = sentence.index("_")
            cont = " " + sentence[i + 1 :].strip()
            out.append(([(sentence[:i] + o1, cont), (sentence[:i] + o2, cont)], int(it["answer"][-1]) - 1, None))
    return out


@pytest.fixture(scope="module")
def harness_run():
    """One lm-eval run of all 7 tasks on the first 6 documents, with the per-request log-likelihoods."""
    from pruning.models import load_model

    model, tok, _ = load_model(STORIES)
    cfg = Z.ZeroShotConfig(limit=6, batch_size=4)
    lm = Z.make_lm(model, tok, cfg.batch_size)
    assert lm.model is model  # the in-memory object, not a re-load
    raw = Z.run_harness(lm, cfg, log_samples=True)
    return model, tok, cfg, raw


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "boolq", "winogrande"])
def test_known_answer_against_plain_loglikelihood(harness_run, name):
    model, tok, cfg, raw = harness_run
    samples = sorted(raw["samples"][name], key=lambda s: s["doc_id"])
    expected = raw_requests(name, cfg.limit)
    assert len(samples) == len(expected) == cfg.limit
    accs, norms = [], []
    for s, (reqs, gold, choices) in zip(samples, expected):
        assert [tuple(a) for a in s["arguments"]] == reqs  # lm-eval built the same prompts
        ours = [plain_loglik(model, tok, c, x) for c, x in reqs]
        theirs = [r[0] for r in s["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=2e-3, rel=1e-4)
        pred = max(range(len(ours)), key=ours.__getitem__)
        assert s["acc"] == float(pred == gold)
        accs.append(s["acc"])
        if choices is not None:  # acc_norm: divide by the choice's length in characters (lm-eval's len(str))
            pn = max(range(len(ours)), key=lambda i: ours[i] / len(choices[i]))
            assert s["acc_norm"] == float(pn == gold)
            norms.append(s["acc_norm"])
    assert raw["results"][name]["acc,none"] == pytest.approx(sum(accs) / len(accs))
    if norms:
        assert raw["results"][name]["acc_norm,none"] == pytest.approx(sum(norms) / len(norms))


def test_hellaswag_arc_challenge_obqa_scored_on_the_same_loglikelihoods(harness_run):
    """The other three tasks: lm-eval's request log-likelihoods equal the plain computation on its own prompts."""
    model, tok, _cfg, raw = harness_run
    for name in ("hellaswag", "arc_challenge", "openbookqa"):
        for s in raw["samples"][name][:3]:
            ours = [plain_loglik(model, tok, c, x) for c, x in s["arguments"]]
            assert [r[0] for r in s["filtered_resps"]] == pytest.approx(ours, abs=2e-3, rel=1e-4)
            gold = s["target"]
            assert s["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == gold)
            lens = [len(x) - 1 for _, x in s["arguments"]]  # continuation minus the " " delimiter
            assert s["acc_norm"] == float(max(range(len(ours)), key=lambda i: ours[i] / lens[i]) == gold)


def test_summary_presets_and_average(harness_run):
    _, _, cfg, raw = harness_run
    for preset, n in (("llm_pruner", 7), ("nirvana", 7), ("slicegpt", 5)):
        block = Z.summarize(raw, Z.ZeroShotConfig(limit=cfg.limit, metric_preset=preset))
        metric = Z.PRESETS[preset]
        want = sum(100 * raw["results"][t][f"{metric[t]},none"] for t in metric) / n
        assert block["average"]["score"] == pytest.approx(want) and block["average"]["n_tasks"] == n
        for t in Z.TASK_ORDER:
            row = block[t]
            assert row["n_docs"] == cfg.limit and row["n_docs_total"] == COUNTS[t]
            assert row["acc"] == raw["results"][t]["acc,none"] and row["acc_stderr"] is not None
            assert (row["acc_norm"] is None) == (t == "winogrande")
            assert row["metric"] == metric.get(t)
    block = Z.summarize(raw, cfg)
    assert block["hellaswag"]["metric"] == "acc_norm" and block["boolq"]["metric"] == "acc"
    assert block["protocol"]["num_fewshot"] == 0 and block["protocol"]["limit"] == cfg.limit
    assert block["protocol"]["harness_version"] == __import__("lm_eval").__version__
    table = Z.zeroshot_table(block)
    assert list(table["task"]) == [*Z.TASK_ORDER, "average (7)"]
    assert table["metric"].tolist()[:7] == [Z.PRESETS["llm_pruner"][t] for t in Z.TASK_ORDER]


def test_per_document_correctness_is_lm_evals_and_gives_the_reported_accuracy(harness_run):
    """The stored bits are lm-eval's per-sample acc/acc_norm in doc_id order; their mean is the reported number
    exactly (lm-eval's mean is sum/len), and so is the preset average."""
    _, _, cfg, raw = harness_run
    block = json.loads(json.dumps(Z.summarize(raw, cfg)))  # as read back from a record
    for t in Z.TASK_ORDER:
        row = block[t]
        samples = sorted(raw["samples"][t], key=lambda s: s["doc_id"])
        metrics = ["acc"] if t == "winogrande" else ["acc", "acc_norm"]
        assert sorted(k for k in row["per_doc"] if k != "docs") == metrics
        for m in metrics:
            bits = doc_values(row, m)
            assert bits.tolist() == [s[m] == 1.0 for s in samples] and len(bits) == cfg.limit
            assert sum(bits.astype(float).tolist()) / len(bits) == row[m]  # bit for bit
        assert row["per_doc"]["docs"] == digest(s["doc_hash"] for s in samples)
    scores = [
        100.0 * (sum(doc_values(block[t], block[t]["metric"]).astype(float).tolist()) / cfg.limit) for t in Z.TASK_ORDER
    ]
    assert sum(scores) / len(scores) == block["average"]["score"]
    assert "per_doc" not in Z.summarize({k: v for k, v in raw.items() if k != "samples"}, cfg)["piqa"]
    broken = {**raw, "samples": {**raw["samples"], "piqa": raw["samples"]["piqa"][1:]}}
    with pytest.raises(PruningError, match="zeroshot piqa: lm-eval logged documents"):
        Z.summarize(broken, cfg)


# ------------------------------------------------------------------------------ pruned: in memory vs reloaded


def test_pruned_in_memory_equals_saved_and_reloaded(tmp_path):
    """Scores of the pruned model handed over in memory = scores of its saved-then-reloaded copy."""
    from transformers import AutoModelForCausalLM

    from pruning.methods.baselines import magnitude
    from pruning.models import load_model
    from pruning.surgery.save import save_pruned

    model, tok, adapter = load_model(STORIES)
    cfg = Z.ZeroShotConfig(tasks=["arc_easy", "winogrande"], limit=8)

    def run(m):
        raw = Z.run_harness(Z.make_lm(m, tok, 8), cfg, log_samples=True)
        lls = [
            r[0]
            for t in cfg.tasks
            for s in sorted(raw["samples"][t], key=lambda s: s["doc_id"])
            for r in s["filtered_resps"]
        ]
        return Z.summarize(raw, cfg), lls

    _, dense_lls = run(model)
    method = magnitude()
    method.apply(model, method.prune(model, 0.3))
    assert adapter.num_params() < 292_800
    pruned, pruned_lls = run(model)
    save_pruned(model, tmp_path / "m", tok)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    again, again_lls = run(reloaded)
    assert pruned_lls == pytest.approx(again_lls, abs=1e-4)
    assert dense_lls != pytest.approx(pruned_lls, abs=1e-2)  # the harness saw the pruned weights
    for t in cfg.tasks:
        assert (pruned[t]["acc"], pruned[t]["acc_norm"]) == (again[t]["acc"], again[t]["acc_norm"]), t
    assert pruned["average"]["score"] == again["average"]["score"]
    assert pruned["average"]["complete"] is False and pruned["average"]["n_tasks"] == 2


# ------------------------------------------------------------------------------ the command line


def _run(args, tmp_path, timeout=3600):
    return cli_run(tmp_path, *args, timeout=timeout)


def _run_in_process(args, tmp_path, capsys, monkeypatch):
    """The same command through ``pruning_lab.run.cli`` in this process: (returncode, stdout, stderr) like _run."""
    from pruning_lab.run import cli

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    with hydra_app_in_process():
        cli([f"store.dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", *args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=0, stdout=out.out, stderr=out.err)


def _check_cli(proc, tmp_path, limit, tasks=Z.TASK_ORDER):
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for t in tasks:
        assert f"{t} " in out
    n = f"{len(tasks)}" if len(tasks) == 7 else f"{len(tasks)} of 7"
    assert f"average ({n})" in out and "llm_pruner" in out and "metric" in out
    rec = json.loads(next((tmp_path / "store" / "records").glob("*.json")).read_text())
    zs = rec["metrics"]["zeroshot"]
    assert zs["protocol"]["limit"] == limit and zs["protocol"]["num_fewshot"] == 0
    assert [zs[t]["n_docs"] for t in tasks] == [limit or COUNTS[t] for t in tasks]
    assert [zs[t]["metric"] for t in tasks] == [Z.PRESETS["llm_pruner"][t] for t in tasks]
    assert zs["average"]["score"] == pytest.approx(sum(zs[t]["score"] for t in tasks) / len(tasks))
    assert f"{zs['average']['score']:.2f}" in out
    for t in tasks:  # the record carries each document's correctness
        bits = doc_values(zs[t], zs[t]["metric"])
        assert len(bits) == zs[t]["n_docs"] and 100.0 * (sum(bits.astype(float).tolist()) / len(bits)) == zs[t]["score"]
    return zs


QUICK_TASKS = ["arc_challenge", "winogrande"]
QUICK_CLI = [
    "eval=zeroshot7_quick",
    "method=dense",
    "threads=1",
    "eval.zeroshot.limit=4",
    "eval.ppl=[]",
    f"eval.zeroshot.tasks=[{','.join(QUICK_TASKS)}]",
]


def test_cli_quick_preset_prints_scores_and_records_in_process(tmp_path, capsys, monkeypatch):
    """The run.py command below, through ``pruning_lab.run.cli`` in this process (the fast tier)."""
    root()
    _check_cli(_run_in_process(QUICK_CLI, tmp_path, capsys, monkeypatch), tmp_path, 4, QUICK_TASKS)


@pytest.mark.slow
def test_cli_quick_preset_prints_scores_and_records(tmp_path):
    """run.py prints the zero-shot table and records the block (two tasks, 4 documents each, no PPL, to stay
    fast; the 7-task full run is the slow test below)."""
    root()
    _check_cli(_run(QUICK_CLI, tmp_path), tmp_path, 4, QUICK_TASKS)


@pytest.mark.slow
def test_cli_full_sets_stories_near_chance(tmp_path):
    """Acceptance 1: `python run.py eval=zeroshot7 method=dense` on the full sets.

    A 260K-parameter TinyStories model knows nothing of these tasks: no score may be clearly above chance, and the
    two-way and four-way tasks sit at chance (measured: PIQA 49.89, WinoGrande 49.88, HellaSwag 24.58, ARC-e 25.17,
    ARC-c 23.98, OBQA 18.80, BoolQ 38.10 = mostly "no" on a 62%-"yes" set; average 32.91).
    """
    root()
    zs = _check_cli(_run(["eval=zeroshot7", "method=dense", "threads=1"], tmp_path), tmp_path, None)
    chance = {
        "boolq": 62.2,
        "piqa": 50,
        "hellaswag": 25,
        "winogrande": 50,
        "arc_easy": 25.5,
        "arc_challenge": 25.5,
        "openbookqa": 25,
    }
    for t, c in chance.items():
        assert zs[t]["score"] < c + 4, (t, zs[t]["score"])
    for t in ("piqa", "hellaswag", "winogrande", "arc_easy"):
        assert abs(zs[t]["score"] - chance[t]) < 3, (t, zs[t]["score"])
    print(
        {t: round(zs[t]["score"], 2) for t in Z.TASK_ORDER},
        "avg",
        round(zs["average"]["score"], 2),
        "seconds",
        zs["protocol"]["seconds"],
    )
