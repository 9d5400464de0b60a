"""Smoke run of the transfer-matrix benchmark on a tiny model, and its metrics.

The benchmarks are scripts outside the package; they are imported from their
paths. The full ground-truth run is not part of the test suite.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import WORDS, load_benchmark, make_texts

pytestmark = pytest.mark.heavy  # tiny end-to-end benchmark runs: `make test`, not test-fast

tm = load_benchmark("transfer_matrix")
sq = load_benchmark("selection_quality")
kt = load_benchmark("kernel_transfer")


# -- tiny-model smoke run ----------------------------------------------------------------------
PROTOCOL = dict(source_max_examples=30, source_max_eval=10, target_max_train=24,
                target_max_test=16, epochs=1, batch_size=8, lr=1e-3, exit_layer=1)


def _write_tasks(folder: Path) -> list[str]:
    """Three small CSV tasks: two-word-pool sentiment (two samples) and a 3-class topic."""
    paths = []
    for i in range(2):
        texts, labels = make_texts(60, seed=10 + i)
        path = folder / f"toy{i}.csv"
        pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
        paths.append(str(path))
    rng = np.random.default_rng(7)
    pools = {"sport": ["ball", "game", "team", "score", "win"],
             "politics": ["vote", "party", "law", "tax"], "spam": ["free", "prize", "call", "now"]}
    texts, labels = [], []
    for j in range(60):
        lab = list(pools)[j % 3]
        words = list(rng.choice(pools[lab], 2)) + list(rng.choice(WORDS[12:22], 3))
        texts.append(" ".join(words) + f" {j}")
        labels.append(lab)
    path = folder / "topics.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine more threads spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model_dir, one_thread):
    root = tmp_path_factory.mktemp("matrix")
    tasks = _write_tasks(root)
    common = dict(tasks=tasks, seeds=[0, 1], work=root / "work", encoder=str(tiny_model_dir),
                  protocol=tm.Protocol(**PROTOCOL), progress=False)
    first = tm.run(results=root / "matrix.jsonl", **common)
    return {"root": root, "common": common, "first": first,
            "rows": tm.read_rows(root / "matrix.jsonl")}


def test_run_writes_every_cell_and_baseline_once(smoke):
    rows = smoke["rows"]
    assert smoke["first"]["ran"] == smoke["first"]["cells"] == 18  # 2 seeds x (6 + 3)
    cells = [tm.cell_key(r) for r in rows]
    assert len(set(cells)) == len(cells) == 18
    tasks = ["toy0", "toy1", "topics"]
    expected = {(s, src, t) for s in (0, 1) for src in [None, *tasks] for t in tasks
                if src != t}
    assert set(cells) == expected
    row = rows[0]
    assert {"accuracy", "macro_f1", "seconds", "finished_at", "protocol"} <= set(row)
    assert row["protocol"]["target_max_train"] == 24 and row["n_train"] == 24
    assert row["protocol_key"] == smoke["first"]["protocol_key"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # the per-seed registries kept the source models and fitted early-exit ESMs
    from stepstone.esm.registry import Registry

    reg = Registry(tm.registry_dir(smoke["common"]["work"], row["protocol_key"], 0))
    entries = reg.entries()
    assert len(entries) == 6 and sum(e.has_model for e in entries) == 3
    assert {e.layer for e in entries} == {None, 1}
    reg.close()


def test_first_stage_benchmark_reads_each_full_depth_esm_once(smoke):
    """bench_first_stage's real ESMs: the targets there are embedded at full depth, so
    exit-layer ESMs stay out, and an ESM in two of the folders (the shipped registry
    and the matrix registry it was shipped from) counts once."""
    fs = load_benchmark("bench_first_stage")
    folder = str(tm.registry_dir(smoke["common"]["work"], smoke["first"]["protocol_key"], 0))
    esms = fs.real_esms([folder, folder])
    assert sorted(esms["tasks"]) == ["topics", "toy0", "toy1"]
    from stepstone.esm.registry import Registry

    with Registry(folder) as reg:  # v1: the paper's AdamW fit; v2: closed-form ridge
        want = {"v2" if reg.config(e.id).fit.get("method") == "ridge" else "v1"
                for e in reg.entries() if e.layer is None}
    assert esms["W"].shape[0] == 3 and set(esms["registry"]) == want


def test_rerun_adds_nothing_and_torn_line_is_redone(smoke, caplog, one_thread):
    path = smoke["root"] / "matrix.jsonl"
    again = tm.run(results=path, **smoke["common"])
    assert again["ran"] == 0 and len(tm.read_rows(path)) == 18
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="transfer_matrix"):
        assert len(tm.read_rows(path)) == 17
    assert "torn" in caplog.text
    redo = tm.run(results=path, **smoke["common"])
    assert redo["ran"] == 1
    rows = tm.read_rows(path)
    assert sorted(map(tm.cell_key, rows), key=str) == sorted(
        map(tm.cell_key, smoke["rows"]), key=str)


def test_shards_cover_every_cell_exactly_once(smoke, one_thread):
    path = smoke["root"] / "sharded.jsonl"
    a = tm.run(results=path, shard=(0, 2), **smoke["common"])
    n_first = len(tm.read_rows(path))
    b = tm.run(results=path, shard=(1, 2), **smoke["common"])
    rows = tm.read_rows(path)
    assert a["ran"] == n_first and a["ran"] + b["ran"] == 18 and 0 < a["ran"] < 18
    cells = [tm.cell_key(r) for r in rows]
    assert len(cells) == len(set(cells)) == 18
    assert set(cells) == {tm.cell_key(r) for r in smoke["rows"]}
    with pytest.raises(SystemExit):
        tm.main(["run", "--shard", "2/2"])


def test_quality_table_from_the_smoke_matrix(smoke, one_thread):
    # First a table over some of the tasks only (e.g. the sources finished so far): it
    # builds and scores the ESM variants of those sources alone, while the work
    # registries hold the third source too.
    part = sq.regenerate(results=smoke["root"] / "matrix.jsonl", out=smoke["root"] / "part",
                         work=smoke["common"]["work"], recompute=True, repeats=1,
                         tasks=smoke["common"]["tasks"][:2], approx_rank=8, lowrank=4,
                         progress=False)
    assert len(part["targets"]) == 2 and len(part["ground_truth"]["perf"]) == 2
    out = smoke["root"] / "out"
    summary = sq.regenerate(results=smoke["root"] / "matrix.jsonl", out=out,
                            work=smoke["common"]["work"], recompute=True, repeats=1,
                            approx_rank=8, lowrank=4, prefilters=(1, 5), progress=False)
    for name in ("selection_quality.json", "selection_quality.md",
                 "selection_quality_scores.json", "transfer_matrix_gains.png",
                 "selection_quality_regret.png"):
        assert (out / name).is_file(), name
    assert not (out / "selection_quality_scores.partial.json").exists()  # done: removed
    methods = summary["methods"]
    assert {"esm-logme", "esm-logme approx-8", "esm-logme lowrank-4", "esm-logme fp16",
            "esm-logme exit-L1", "esm-logme seed-1 ESMs", "knn", "source-logme",
            "textemb", "vocab", sq.RANDOM, sq.FIXED, sq.POPULAR,
            "esm-logme prefilter-1", "esm-logme prefilter-5"} == set(methods)
    for name, q in methods.items():
        for k in ("regret@1", "regret@3", "regret@5", "ndcg@5"):
            if name == "esm-logme prefilter-1" and k != "regret@1":
                continue  # one source kept: the rest is not defined (checked below)
            assert np.isfinite(q[k]["mean"]), (name, k)
            assert 0.0 <= q[k]["mean"] <= 100.0
            lo, hi = q[k]["ci95"]
            assert lo <= q[k]["mean"] <= hi
        assert q["ms_per_source"] >= 0
        assert (name == sq.RANDOM) == (not q["p_vs_random"])
        assert all(0.0 < p <= 1.0 for m, p in q["p_vs_random"].items()
                   if "prefilter" not in name or m == "regret@1")
    # fp16 ESMs order the toy sources exactly like the float32 ones: no difference at all
    assert methods["esm-logme fp16"]["p_vs_esm_logme"]["regret@1"] == 1.0
    # A first stage that keeps every source (K = 5 >= 2) ranks the shipped ESMs (the
    # full-depth seed-0 ones) exactly as esm-logme does; one that keeps 1 has a top-1
    # and nothing past it.
    exact, wide = methods["esm-logme"], methods["esm-logme prefilter-5"]
    assert {t: v["top1"] for t, v in wide["per_target"].items()} == \
        {t: v["top1"] for t, v in exact["per_target"].items()}
    assert wide["p_vs_esm_logme"]["regret@1"] == 1.0
    narrow = methods["esm-logme prefilter-1"]
    assert np.isnan(narrow["regret@3"]["mean"]) and np.isnan(narrow["ndcg@5"]["mean"])
    assert np.isnan(narrow["p_vs_random"]["regret@5"])
    assert all(np.isnan(v["spearman"]) for v in narrow["per_target"].values())
    assert "| esm-logme prefilter-1 |" in (out / "selection_quality.md").read_text()
    # the exact random expectation of regret@k over the (2) sources of each target
    gt_perf = summary["ground_truth"]["perf"]
    for t in summary["targets"]:
        perf, base = gt_perf[t], summary["ground_truth"]["baseline"][t]
        best = max(max(perf.values()), base)
        mean_pick = float(np.mean(list(perf.values())))
        assert methods[sq.RANDOM]["per_target"][t]["regret@1"] == pytest.approx(
            100 * (best - mean_pick) / best)
    # fp16 storage halves the weights; the kept model is far larger than an ESM
    assert methods["esm-logme fp16"]["bytes_per_source"] < \
        methods["esm-logme"]["bytes_per_source"]
    assert methods["source-logme"]["bytes_per_source"] > \
        10 * methods["esm-logme"]["bytes_per_source"]
    assert np.isfinite(summary["noise"]["cell_std"])
    assert "| esm-logme |" in (out / "selection_quality.md").read_text()
    # build-to-build spread: every source was built for both seeds here; the seed-0
    # build's order is the esm-logme row's, and each build's regret@1 is what its own
    # top source measures
    spread = summary["build_spread"]
    assert spread["sources"] == sorted(summary["tasks"]) == sorted(spread["per_target"])
    cached = json.loads((out / "selection_quality_scores.json").read_text())["build_spread"]
    for t, v in spread["per_target"].items():
        scores0 = cached["scores"][t]["s0"]
        assert v["sources"] == 2 and t not in scores0
        assert max(scores0, key=lambda s: (scores0[s], s)) == exact["per_target"][t]["top1"]
        for build in ("s0", "s1"):
            sc = cached["scores"][t][build]
            top = max(sc, key=lambda s: (sc[s], s))
            best = max(max(gt_perf[t].values()), summary["ground_truth"]["baseline"][t])
            assert v[f"regret@1 {build}"] == pytest.approx(100 * (best - gt_perf[t][top]) / best)
        assert v["kendall_tau"] in (-1.0, 1.0) and v["same_top1"] in (0.0, 1.0)
    assert "Build-to-build spread: the 3 sources built twice" in \
        (out / "selection_quality.md").read_text()
    # Regenerating from the cached scores needs no work folder and gives the same table.
    again = sq.regenerate(results=smoke["root"] / "matrix.jsonl", out=out,
                          work=smoke["root"] / "nowhere", progress=False)
    assert json.dumps(again["methods"], sort_keys=True, default=float) == json.dumps(
        summary["methods"], sort_keys=True, default=float)


def test_ray_executor_gives_the_local_matrix(smoke, one_thread, ray_cluster):
    """`run --executor ray`: sources and cells as Ray jobs, the same rows as locally."""
    from stepstone.finetune.executor import ExecutorSettings

    path = smoke["root"] / "ray.jsonl"
    common = {**smoke["common"], "work": smoke["root"] / "ray-work"}
    out = tm.run(results=path, executor=ExecutorSettings(executor="ray", num_workers=2),
                 **common)
    assert out["ran"] == 18 and out["failed"] == {}
    rows = tm.read_rows(path)
    assert len(rows) == 18
    local = {tm.cell_key(r): (r["accuracy"], r["macro_f1"]) for r in smoke["rows"]}
    assert {tm.cell_key(r): (r["accuracy"], r["macro_f1"]) for r in rows} == local


def test_an_interrupted_rescoring_resumes_at_the_first_unfinished_method(smoke, tmp_path,
                                                                         one_thread):
    rows = tm.read_rows(smoke["root"] / "matrix.jsonl")
    gt = sq.load_ground_truth(rows)
    work = Path(smoke["common"]["work"]) / gt.protocol_key
    partial = tmp_path / "partial.json"
    opts = dict(approx_rank=8, lowrank=4, repeats=1, prefilters=(1,), progress=False)
    full = sq.compute_scores(gt, work, partial=partial, **opts)
    names = list(full["methods"])
    assert json.loads(partial.read_text())["methods"].keys() == full["methods"].keys()
    # as if stopped after the first two methods; the first one marked to show it is reused
    cut = json.loads(partial.read_text())
    cut["methods"] = {n: cut["methods"][n] for n in names[:2]}
    cut["methods"][names[0]]["marker"] = True
    partial.write_text(json.dumps(cut))
    again = sq.compute_scores(gt, work, partial=partial, **opts)
    assert list(again["methods"]) == names  # the table's order is kept
    assert again["methods"][names[0]].get("marker") is True  # taken, not rescored
    for n in names[2:]:  # scored again: the same orders
        assert "marker" not in again["methods"][n]
        assert {t: v["orders"] for t, v in again["methods"][n]["per_target"].items()} == \
            {t: v["orders"] for t, v in full["methods"][n]["per_target"].items()}, n
    # a partial file of another table (other targets) is not used
    other = json.loads(partial.read_text())
    other["targets"] = other["targets"][:1]
    partial.write_text(json.dumps(other))
    fresh = sq.compute_scores(gt, work, partial=partial, **opts)
    assert "marker" not in fresh["methods"][names[0]]


def test_kernel_order_needs_every_source_of_a_target():
    def pair(t, s, score, secs=1.0):
        return {"kernel_key": "kk", "target": t, "source": s, "score": score, "seconds": secs,
                "model_bytes": 100, "settings": {"kernel": "sgd", "params": "biases",
                                                 "solver": "regression", "shots": 4,
                                                 "eval_examples": 8}}

    pairs = [pair("T", "a", 0.6, 2.0), pair("T", "b", 0.9, 4.0), pair("T", "c", 0.6, 3.0),
             pair("U", "a", 0.5)]  # U lacks b
    m = kt.method_entry(pairs, {"T": ["a", "b", "c"], "U": ["a", "b"]})
    assert set(m["per_target"]) == {"T"}
    assert m["per_target"]["T"]["orders"] == [["b", "a", "c"]]  # ties by task id
    assert m["per_target"]["T"]["ms_per_source"] == 3000.0  # the median pair
    assert "1 of 2 targets" in m["spec"]["note"]
    assert kt.method_entry(pairs[3:], {"U": ["a", "b"]}) is None
    with pytest.raises(ValueError, match="several settings"):
        kt.method_entry(pairs + [{**pairs[0], "kernel_key": "other"}], {"T": ["a"]})


def test_kernel_pairs_resume_and_enter_the_table(smoke, one_thread):
    root = smoke["root"]
    opts = dict(matrix=root / "matrix.jsonl", results=root / "kernel.jsonl",
                work=smoke["common"]["work"], shots=4, eval_examples=8, progress=False)
    first = kt.run_pass(**opts)
    assert first == {"done": 6, "run": 6, "waiting": 0}  # 3 targets x 2 sources
    pairs = kt.read_pairs(root / "kernel.jsonl")
    assert {(p["target"], p["source"]) for p in pairs} == {
        (t, s) for t in ("toy0", "toy1", "topics") for s in ("toy0", "toy1", "topics")
        if s != t}
    assert all(0.0 <= p["score"] <= 1.0 and p["model_bytes"] > 0 for p in pairs)
    assert kt.run_pass(**opts)["run"] == 0
    out = root / "out-kernel"
    summary = sq.regenerate(results=root / "matrix.jsonl", out=out,
                            work=smoke["common"]["work"], kernel_results=root / "kernel.jsonl",
                            repeats=1, approx_rank=8, lowrank=4, progress=False)
    q = summary["methods"]["kernel (eNTK)"]
    assert q["regret@1"]["n"] == 3 and 0.0 <= q["regret@1"]["mean"] <= 100.0
    assert q["embed_ms_per_target"] == 0.0 and q["ms_per_source"] > 0
    assert "| kernel (eNTK) |" in (out / "selection_quality.md").read_text()


def test_protocol_v2_fields_leave_v1_keys_alone(tiny_model_dir):
    from stepstone.esm.encoder import load_encoder

    enc = load_encoder(str(tiny_model_dir), max_length=32)
    v1 = tm.Protocol(**PROTOCOL)
    assert set(tm.V2_FIELDS).isdisjoint(v1.record(enc))
    v2 = tm.Protocol(**PROTOCOL, target_lr=5e-3, esm_fit="ridge")
    assert v2.record(enc)["target_lr"] == 5e-3
    assert tm.Protocol.key_of(v2.record(enc)) != tm.Protocol.key_of(v1.record(enc))
    assert v2.finetune_settings(0, target=True).lr == 5e-3
    assert v2.finetune_settings(0).lr == v1.finetune_settings(0).lr == 1e-3


def test_v2_run_exports_esms_and_runs_a_target_subset(tmp_path, smoke, one_thread):
    """The v2 shape on the tiny model: closed-form ESMs with the paper's fit beside them
    kept under results/, the majority floor in every row, a second seed on one target."""
    from stepstone.esm.model import EmbeddingSpaceMap

    protocol = tm.Protocol(**{**PROTOCOL, "exit_layer": None}, target_lr=5e-3,
                           target_epochs=2, esm_fit="ridge", esm_variants="adamw")
    common = {**smoke["common"], "protocol": protocol, "work": tmp_path / "work"}
    results = tmp_path / "results" / "m.jsonl"
    first = tm.run(results=results, **{**common, "seeds": [0]})
    rows = tm.read_rows(results)
    assert first["ran"] == 9 and len(rows) == 9
    assert all(0 < r["majority_accuracy"] < 1 and "majority_macro_f1" in r for r in rows)
    check = tm.baseline_check(rows)
    assert set(check) == {"toy0", "toy1", "topics"}
    for target, entry in check.items():
        base = next(r for r in rows if r["source"] is None and r["target"] == target)
        assert entry["margin"] == pytest.approx(base["macro_f1"] - base["majority_macro_f1"],
                                                abs=1e-4)
        assert entry["learns"] == (entry["margin"] >= tm.LEARNS_MARGIN)
    assert all(r["steps"] == 2 * 3 for r in rows)  # 24 examples, batch 8, 2 target epochs
    out = tm.esm_export_dir(results, first["protocol_key"])
    for fit in ("ridge", "adamw"):
        folders = sorted((out / "s0" / fit).iterdir())
        assert len(folders) == 3
        esm = EmbeddingSpaceMap.load(folders[0])
        assert esm.config.fit.get("method", "adamw") == fit
        assert "identity_val_mse" in esm.config.metrics
    second = tm.run(results=results, **{**common, "seeds": [1]}, targets="topics")
    assert second["ran"] == 3  # (none, toy0, toy1) -> topics
    assert {tm.cell_key(r) for r in tm.read_rows(results)} >= {
        (1, None, "topics"), (1, "toy0", "topics"), (1, "toy1", "topics")}
    # the quality table scores the paper's fit from the exported ESMs beside the new one
    summary = sq.regenerate(results=results, out=tmp_path / "quality", work=common["work"],
                            recompute=True, repeats=1, approx_rank=8, lowrank=4,
                            progress=False)
    assert "esm-logme (adamw fit)" in summary["methods"]
    # the pre-registered headline: the targets whose baseline clears the majority floor
    # by LEARNS_MARGIN on every seed, evaluated on their own beside all targets
    learns = sorted(t for t, c in tm.baseline_check(tm.read_rows(results)).items()
                    if c["learns"])
    head = summary["headline"]
    assert sorted(head["targets"]) == learns and set(summary["baselines"]) == set(check)
    table = (tmp_path / "quality" / "selection_quality.md").read_text()
    assert "| learns (≥ 0.1) |" in table and table.count("| topics |") == 1
    assert 0 < len(learns) < 3  # the toy topics task does not learn in 6 steps: a split
    assert set(head["methods"]["esm-logme"]["per_target"]) == set(learns)
    assert "**Headline: the" in table and "**All 3 targets:**" in table
    # a subset evaluation is the full one restricted to those targets
    full = summary["methods"]["esm-logme"]["per_target"]
    sub = sq.evaluate(sq.load_ground_truth(tm.read_rows(results)),
                      json.loads((tmp_path / "quality" / "selection_quality_scores.json")
                                 .read_text()), targets=["topics"])
    assert sub["esm-logme"]["per_target"] == {"topics": full["topics"]}
    assert sub["esm-logme"]["regret@1"]["mean"] == pytest.approx(full["topics"]["regret@1"])
    assert "esm-logme seed-1 ESMs" not in summary["methods"]  # seed 1 lacks source topics
    fits = summary["esm_fits"]
    assert {(f["fit"], f["source"]) for f in fits} == {
        (fit, t) for fit in ("ridge", "adamw") for t in ("toy0", "toy1", "topics")}
    assert all(f["val_mse"] < f["identity_val_mse"] for f in fits if f["fit"] == "ridge")
    assert "| toy0 | full |" in (tmp_path / "quality" / "esm_fits.md").read_text()


def test_a_source_fine_tunes_while_another_process_holds_the_shared_registry(
        smoke, tmp_path, tiny_model_dir, one_thread):
    """Shard processes build their sources at the same time: the fine-tuning runs in a
    staging registry of its own, and the shared registry's write lock is taken only to
    add the finished entries. A second call finds the source and builds nothing."""
    import threading

    from stepstone.esm import registry_lock
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.registry import Registry
    from stepstone.esm.specs import load_task

    work, key = tmp_path / "work", "k"
    shared = tm.registry_dir(work, key, 0)
    shared.mkdir(parents=True)
    protocol = smoke["common"]["protocol"]
    base = load_encoder(str(tiny_model_dir))
    task = load_task(smoke["common"]["tasks"][0])
    staging = work / key / "staging-s0" / task.task_id
    out: dict = {}

    def build() -> None:  # the registry is read in this thread (sqlite's rule)
        try:
            with tm.built_source(work, key, 0, task, base, protocol) as reg:
                out["layers"] = sorted(e.layer or 0 for e in reg.entries()
                                       if e.task_id == task.task_id)
                kept = tm.source_entry(reg, task.task_id, base)
                out["model"] = (reg.model_dir(kept.id) / "encoder").is_dir()
                out["problems"] = reg.verify().problems
        except BaseException as err:  # surfaced below
            out["error"] = err

    with registry_lock.write_lock(shared):  # another shard writing, e.g. its own build
        worker = threading.Thread(target=build)
        worker.start()
        for _ in range(600):  # the fine-tuning finishes without the shared lock
            if (staging / "registry.sqlite").exists():
                with Registry(staging) as st:
                    if any(e.layer is None and e.has_model for e in st.entries()):
                        break
            worker.join(0.1)
        else:
            pytest.fail("the source was not built while the shared registry was locked")
        assert worker.is_alive()  # waiting for the shared lock to add its entries
    worker.join(120)
    assert "error" not in out, out.get("error")
    assert out["layers"] == [0, protocol.exit_layer]  # full depth and the exit layer
    assert out["model"] and out["problems"] == []  # the kept model came along, all verifies
    assert not staging.exists()  # gone once the shared registry has every entry
    # found complete (full depth with its model, and the exit layer, whose encoder has
    # another fingerprint): a rerun or the next shard builds nothing
    assert tm._has_source(shared, task.task_id, base, (protocol.exit_layer,))
    assert not tm._has_source(shared, task.task_id, base, (protocol.exit_layer + 1,))
    again = tm.built_source(work, key, 0, task, base, protocol)
    again.close()
    assert not staging.exists()  # found in the shared registry: nothing staged


def test_ship_writes_the_full_depth_esms_that_a_rebuild_reproduces(smoke, tmp_path):
    """`transfer_matrix.py ship`: the seed-0 full-depth ESMs, no kept models, and a
    rebuild with the same settings adds nothing (same settings keys)."""
    from stepstone.esm.registry import Registry
    from stepstone.finetune.build import BuildSettings, build_registry

    key = smoke["first"]["protocol_key"]
    tasks = smoke["common"]["tasks"]
    out = tmp_path / "shipped"
    summary = tm.ship(out=out, protocol_key=key, tasks=tasks, work=smoke["common"]["work"])
    assert len(summary["esms"]) == 3
    with Registry(out) as reg:
        entries = reg.entries()
        assert sorted(e.id for e in entries) == sorted(summary["esms"])
        assert all(e.layer is None and not e.has_model for e in entries)
    protocol = smoke["common"]["protocol"]
    from stepstone.esm.encoder import load_encoder

    encoder = load_encoder(smoke["common"]["encoder"])
    settings = BuildSettings(**{**vars(protocol.build_settings(0, encoder.num_layers)),
                                "keep_models": False, "exit_layers": ()})
    report = build_registry(out, tasks, encoder=encoder, settings=settings, progress=False)
    assert report.added == [] and len(report.skipped) == 3
    with pytest.raises(ValueError, match="no full-depth ESM"):
        tm.ship(out=tmp_path / "x", protocol_key=key, tasks=[*tasks, "builtin:sms_spam"],
                work=smoke["common"]["work"])
    assert not (tmp_path / "x").exists()


def _half_done_source(smoke, tmp_path) -> tuple[Path, list[dict], str, dict]:
    """A results file with one cell of one source dropped (that source is half done),
    the smoke run's ESM exports beside it, and a fresh work folder (so it is rebuilt)."""
    import shutil

    common = {**smoke["common"], "work": tmp_path / "fresh-work", "seeds": [0]}
    path = tmp_path / "matrix.jsonl"
    shutil.copytree(tm.esm_export_dir(smoke["root"] / "matrix.jsonl",
                                      smoke["first"]["protocol_key"]),
                    tm.esm_export_dir(path, smoke["first"]["protocol_key"]))
    rows = [r for r in smoke["rows"] if r["seed"] == 0]
    src = rows[-1]["source"]
    dropped = [r for r in rows if r["source"] == src][0]
    kept = [r for r in rows if r is not dropped]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path, kept, src, common


def _tamper_exports(path: Path, key: str, src: str) -> None:
    """Make the exported copies of ``src`` look like another build's."""
    from safetensors.torch import load_file, save_file

    from stepstone.esm.model import WEIGHTS_NAME

    fit = tm.Protocol(**PROTOCOL).esm_fit or "adamw"  # the primary fit's exports
    for folder in (tm.esm_export_dir(path, key) / "s0" / fit).glob(f"{src}-*"):
        state = load_file(str(folder / WEIGHTS_NAME))
        save_file({k: v + 0.01 for k, v in state.items()}, str(folder / WEIGHTS_NAME),
                  metadata={"format": "pt"})


def test_a_source_rebuilt_differently_keeps_its_rows_from_one_build(
        smoke, tmp_path, caplog, one_thread):
    """A source whose first cells ran elsewhere is rebuilt here: with the same weights
    (CPU, same seed) its other cells run; with other weights (say a GPU build) they are
    left alone, so no source's row mixes two source models."""
    path, kept, src, common = _half_done_source(smoke, tmp_path)
    redo = tm.run(results=path, **common)  # rebuilt in a fresh work folder: same weights
    assert redo["ran"] == 1 and redo["skipped_sources"] == []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    _tamper_exports(path, smoke["first"]["protocol_key"], src)
    with caplog.at_level(logging.WARNING, logger="transfer_matrix"):
        again = tm.run(results=path, **common)
    assert again["ran"] == 0 and again["skipped_sources"] == [f"s0:{src}"]
    assert "differ from those exported" in caplog.text
    assert len(tm.read_rows(path)) == len(kept)


def test_ray_executor_leaves_a_differently_built_source_alone(smoke, tmp_path, one_thread,
                                                              ray_cluster):
    from stepstone.finetune.executor import ExecutorSettings

    path, kept, src, common = _half_done_source(smoke, tmp_path)
    _tamper_exports(path, smoke["first"]["protocol_key"], src)
    out = tm.run(results=path, executor=ExecutorSettings(executor="ray", num_workers=2),
                 **common)
    assert out["ran"] == 0 and out["skipped_sources"] == [f"s0:{src}"]
    assert len(tm.read_rows(path)) == len(kept)


def test_gpu_script_runs_both_seeds_with_parallel_shards(tmp_path, tiny_model_dir):
    """benchmarks/gpu_matrix.sh, on the CPU with a tiny model: two shard processes,
    seed 0 over every task, then seed 1 over its subset, all rows in $OUT."""
    import os
    import subprocess
    import sys

    tasks = _write_tasks(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "P": "2", "LIMIT_S": "300", "DEVICE": "cpu",
           "PY": sys.executable, "WORK": str(tmp_path / "work"),
           "SRC_RESULTS": str(tmp_path / "none.jsonl"), "SEED1_TASKS": ",".join(tasks[:2]),
           "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PROTOCOL.items()]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_matrix.sh"),
                           "--tasks", ",".join(tasks), "--encoder", str(tiny_model_dir),
                           *flags], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = tm.read_rows(out / "transfer_matrix_v2.jsonl")
    cells = {tm.cell_key(r) for r in rows}
    assert len(cells) == len(rows) == 9 + 4  # seed 0: 3 + 3 x 2; seed 1: 2 + 2 x 1
    assert {c for c in cells if c[0] == 1} == {
        (1, None, "toy0"), (1, None, "toy1"), (1, "toy0", "toy1"), (1, "toy1", "toy0")}
    assert {r["protocol"]["target_lr"] for r in rows} == {1e-4}  # the v2 preset
    assert (out / "shard-0.log").is_file() and (out / "shard-1.log").is_file()
