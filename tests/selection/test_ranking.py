import json
import shutil

import numpy as np
import pytest

from stepstone.cli import main
from stepstone.esm.data import make_task
from stepstone.esm.encoder import EncoderMismatchError, load_encoder
from stepstone.esm.registry import Registry
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.train import FinetuneSettings
from stepstone.selection.logme import logme_score
from stepstone.selection.ranking import RankedSource, Ranking, prepare_target, rank
from stepstone.selection.scorers import METHODS, knn_loo_accuracy
from tests.conftest import make_texts


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("reg")
    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    tasks = []
    for i in range(4):
        texts, labels = make_texts(60, seed=10 + i)
        tasks.append(make_task(f"src{i}", texts, labels))
    build_registry(folder, tasks, encoder=encoder, progress=False,
                   settings=BuildSettings(max_examples=40, max_eval=10,
                                          finetune=FinetuneSettings(epochs=1, batch_size=8)))
    return folder


@pytest.fixture()
def target_task():
    texts, labels = make_texts(50, seed=99)
    return make_task("tgt", texts, labels)


def _rank(reg, task, tiny_model_dir, **kw):
    enc = load_encoder(str(tiny_model_dir), max_length=32)
    return rank(task, reg, encoder=enc, cache=False, progress=False, **kw)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("source-logme", "kernel")])
def test_every_method_ranks(tiny_registry, target_task, tiny_model_dir, method):
    r = _rank(tiny_registry, target_task, tiny_model_dir, method=method)
    assert isinstance(r, Ranking) and len(r) == 4 and not r.errors
    assert sorted(r.task_ids) == ["src0", "src1", "src2", "src3"]
    df = r.to_pandas()
    assert list(df["rank"]) == [1, 2, 3, 4] and df["score"].is_monotonic_decreasing
    # 'logme' gives every source one score: it prints that reference, not a ranking
    assert ("src0" in str(r)) == (method != "logme")


def test_esm_logme_equals_explicit_logme(tiny_registry, target_task, tiny_model_dir):
    r = _rank(tiny_registry, target_task, tiny_model_dir)
    reg = Registry(tiny_registry)
    enc = load_encoder(str(tiny_model_dir), max_length=32)
    target = prepare_target(target_task, enc)
    for row in r.rows:
        esm = reg.load_esm(row.esm_id, encoder=enc.identity)
        explicit = logme_score(esm.transform(target.X), target.labels)
        assert row.score == pytest.approx(explicit, rel=1e-6, abs=1e-9)
    assert r.reference == pytest.approx(logme_score(target.X, target.labels), rel=1e-9)


def test_target_in_registry_is_excluded(tiny_registry, tiny_model_dir):
    texts, labels = make_texts(60, seed=10)
    same = make_task("src0", texts, labels)
    assert "src0" not in _rank(tiny_registry, same, tiny_model_dir).task_ids
    assert "src0" in _rank(tiny_registry, same, tiny_model_dir, exclude_target=False).task_ids


def test_broken_esm_is_reported_and_rest_rank(tiny_registry, target_task, tiny_model_dir,
                                              tmp_path):
    copy = tmp_path / "reg"
    shutil.copytree(tiny_registry, copy)
    broken = Registry(copy).entries()[1].id
    (copy / "esms" / broken / "model.safetensors").write_bytes(b"not safetensors")
    r = _rank(copy, target_task, tiny_model_dir)
    assert len(r) == 3 and broken in r.errors and broken not in [x.esm_id for x in r.rows]


def test_prefilter_keeps_the_k_best_of_the_first_stage(tiny_registry, target_task,
                                                       tiny_model_dir):
    """Issue 18: it kept the K + 1 nearest of all sources, then cut them by name."""
    from stepstone.selection.index import sketch_index

    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    prepared = prepare_target(target_task, encoder, cache=None)
    index = sketch_index(Registry(tiny_registry))
    query = index.query(prepared.X, prepared.labels)
    brute = sorted(index.ids.values(), key=lambda i: -float(index.vector(i) @ query))
    for k in (1, 2):
        pre = _rank(tiny_registry, target_task, tiny_model_dir, prefilter=k, method="random")
        assert sorted(r.esm_id for r in pre.rows) == sorted(brute[:k])
        assert pre.settings["candidates"] == k


def test_approx_rank_close_to_exact(tiny_registry, target_task, tiny_model_dir):
    exact = _rank(tiny_registry, target_task, tiny_model_dir)
    approx = _rank(tiny_registry, target_task, tiny_model_dir, approx_rank=33)  # = d + 1
    np.testing.assert_allclose([x.score for x in approx.rows], [x.score for x in exact.rows],
                               rtol=1e-8)


def test_other_encoder_refused_with_both_names(tiny_registry, target_task, tiny_model_dir):
    enc = load_encoder(str(tiny_model_dir), max_length=32, pooling="cls")
    with pytest.raises(EncoderMismatchError, match="built for .*mean.* asked for is .*cls"):
        rank(target_task, tiny_registry, encoder=enc, cache=False, progress=False)


def test_knn_loo_matches_sklearn():
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    y = (X[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)
    ours = knn_loo_accuracy(X, y, k=1)
    ref = cross_val_score(KNeighborsClassifier(1, metric="cosine"), X, y,
                          cv=LeaveOneOut()).mean()
    assert ours == pytest.approx(ref)


def test_ranking_validates_and_plots(tmp_path):
    rows = [RankedSource(1, "a", "a", 0.5, 10, "classification"),
            RankedSource(2, "b", "b", 0.1, 10, "classification")]
    r = Ranking("t", "esm-logme", rows, reference=0.2)
    assert r.plot(tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="sorted by score"):
        Ranking("t", "m", rows[::-1])


def test_cli_rank_json_csv_plot(tiny_registry, tmp_path, tiny_model_dir, capsys):
    import pandas as pd

    texts, labels = make_texts(40, seed=5)
    pd.DataFrame({"s": texts, "y": labels}).to_csv(tmp_path / "t.csv", index=False)
    code = main(["rank", str(tmp_path / "t.csv"), "--registry", str(tiny_registry),
                 "--text-column", "s", "--label-column", "y", "--encoder", str(tiny_model_dir),
                 "--json", "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png"),
                 "--top", "2", "--no-cache"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["ranking"]) == 2 and out["timings"]["total"] > 0
    assert out["settings"]["target_examples"] > 0
    assert len(pd.read_csv(tmp_path / "r.csv")) == 2 and (tmp_path / "r.png").exists()


def test_early_exit_esms_are_tied_to_their_layer(tmp_path, tiny_model_dir, target_task):
    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    texts, labels = make_texts(60, seed=3)
    report = build_registry(tmp_path, [make_task("src", texts, labels)], encoder=encoder,
                            progress=False,
                            settings=BuildSettings(max_examples=30, exit_layers=(1,),
                                                   finetune=FinetuneSettings(epochs=1)))
    reg = Registry(tmp_path)
    assert len(report.added) == 2 and sorted(str(e.layer) for e in reg.entries()) == ["1", "None"]
    full = rank(target_task, reg, encoder=encoder, cache=False, progress=False)
    early = rank(target_task, reg, encoder=encoder, layer=1, cache=False, progress=False)
    assert full.settings["layer"] is None and early.settings["layer"] == 1
    assert full.rows[0].esm_id != early.rows[0].esm_id  # each ranking used its own layer's ESM
    assert len(full) == len(early) == 1
    # adaptive: an impossible threshold falls back to the full encoder, 0 exits at layer 1
    assert rank(target_task, reg, encoder=encoder, layer="auto", exit_threshold=1.01,
                cache=False, progress=False).settings["layer"] is None
    assert rank(target_task, reg, encoder=encoder, layer="auto", exit_threshold=-1.0,
                cache=False, progress=False).settings["layer"] == 1
    again = build_registry(tmp_path, [make_task("src", texts, labels)], encoder=encoder,
                           progress=False,
                           settings=BuildSettings(max_examples=30, exit_layers=(1,),
                                                  finetune=FinetuneSettings(epochs=1)))
    assert again.added == [] and again.skipped == ["src"]


def test_vocab_and_textemb_values(tiny_registry, tiny_model_dir):
    from stepstone.selection.scorers import TextEmb, VocabOverlap
    from stepstone.selection.target import Target

    reg = Registry(tiny_registry)
    entries = reg.entries()
    enc = load_encoder(str(tiny_model_dir), max_length=32)
    X = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    target = Target("t", X, np.array([0, 1, 0, 1]), "classification",
                    ["good movie", "bad zzzunseen", "good", "movie"], enc.identity)
    vocab = VocabOverlap().score(target, reg, entries).values
    for e in entries:
        source_words = set(reg.profile(e.id)["token_counts"])
        words = {"good", "movie", "bad", "zzzunseen"}
        assert vocab[e.id] == pytest.approx(len(words & source_words) / 4)
    text = TextEmb().score(target, reg, entries).values
    mean = X.mean(0) / np.linalg.norm(X.mean(0))
    for e in entries:
        assert text[e.id] == pytest.approx(float(e.task_vector @ mean), abs=1e-6)


def test_source_logme_uses_kept_models(tmp_path, tiny_model_dir, target_task):
    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    texts, labels = make_texts(60, seed=4)
    settings = dict(max_examples=30, finetune=FinetuneSettings(epochs=1))
    build_registry(tmp_path, [make_task("kept", texts, labels)], encoder=encoder,
                   progress=False, settings=BuildSettings(**settings, keep_models=True))
    build_registry(tmp_path, [make_task("notkept", texts[:50], labels[:50])], encoder=encoder,
                   progress=False, settings=BuildSettings(**settings))
    r = rank(target_task, tmp_path, "source-logme", encoder=encoder, cache=False,
             progress=False)
    assert r.task_ids == ["kept"] and "--keep-models" in next(iter(r.errors.values()))
    # the score is LogME of the target under the kept fine-tuned encoder
    reg = Registry(tmp_path)
    kept = next(e for e in reg.entries() if e.task_id == "kept")
    tuned = load_encoder(str(reg.model_dir(kept.id) / "encoder"), max_length=32)
    target = prepare_target(target_task, encoder)
    expected = logme_score(tuned.embed(target.texts, progress=False), target.labels)
    assert r.rows[0].score == pytest.approx(expected, rel=1e-6)


# -- options: each method declares the ones it takes; the rest are refused up front ----------
def test_each_method_declares_its_constructor_options():
    import inspect

    from stepstone.selection.scorers import RANK_OPTIONS, SCORERS

    for name, cls in SCORERS.items():
        params = inspect.signature(cls.__init__).parameters.values()
        own = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert own == set(cls.options) - set(RANK_OPTIONS), name
        assert "prefilter" in cls.options, name  # a candidate filter: applies to every method


@pytest.mark.parametrize(("method", "options", "message"), [
    ("knn", {"approx_rank": 5},
     "method 'knn' does not take 'approx_rank'; it takes: k, prefilter, layer."),
    ("random", {"layer": 1}, "method 'random' does not take 'layer'; it takes: seed, prefilter."),
    ("source-logme", {"layer": "auto"}, "method 'source-logme' does not take 'layer'"),
    ("esm-logme", {"scorer_options": {"k": 3}},
     "method 'esm-logme' does not take 'k'; it takes: approx_rank, chunk, n_jobs."),
    ("esm-logme", {"scorer_options": {"prefilter": 3}}, "does not take 'prefilter'"),
    ("no-such", {}, "'method' must be one of"),
    ("esm-logme", {"top": 0}, "'top' must be an int >= 1 or None; got 0."),
    ("esm-logme", {"top": -3}, "'top' must be an int >= 1 or None; got -3."),
    ("esm-logme", {"approx_rank": 0}, "'approx_rank' must be a positive int or None; got 0."),
    ("esm-logme", {"prefilter": 0}, "'prefilter' must be an int >= 1 or None; got 0."),
    ("esm-logme", {"max_examples": 1}, "'max_examples' must be an int >= 2 or None; got 1."),
    ("esm-logme", {"layer": 0}, "'layer' must be an int >= 1 or None; got 0."),
    ("esm-logme", {"exit_threshold": 0.9}, "'exit_threshold' applies only with layer='auto'"),
    ("esm-logme", {"pooling": "cls"}, "'pooling' applies to an encoder given by name"),
    ("esm-logme", {"task_options": {"text_column": "s"}}, "'task_options' apply to a target"),
])
def test_rank_refuses_options_before_any_work(tmp_path, tiny_model_dir, target_task,
                                              monkeypatch, method, options, message):
    import stepstone.selection.ranking as ranking
    from stepstone.esm.errors import ConfigError

    monkeypatch.setattr(ranking, "prepare_target", lambda *a, **k: pytest.fail("embedded"))
    enc = load_encoder(str(tiny_model_dir), max_length=32)
    # A missing registry: opening it would raise RegistryError, so the check comes first.
    with pytest.raises(ConfigError) as err:
        rank(target_task, tmp_path / "no-registry", method, encoder=enc, cache=False,
             progress=False, **options)
    assert message in str(err.value)


def test_knn_refuses_a_regression_target_before_embedding(tiny_registry, tiny_model_dir,
                                                          monkeypatch):
    import stepstone.selection.ranking as ranking
    from stepstone.esm.errors import ConfigError

    monkeypatch.setattr(ranking, "prepare_target", lambda *a, **k: pytest.fail("embedded"))
    texts, _ = make_texts(40, seed=3)
    task = make_task("reg", texts, [float(i % 7) for i in range(40)], label_kind="regression")
    with pytest.raises(ConfigError, match="method 'knn' needs a classification target"):
        _rank(tiny_registry, task, tiny_model_dir, method="knn")


def test_scorers_list_expected_failures_and_let_bugs_through(tiny_registry, target_task,
                                                             tiny_model_dir, monkeypatch):
    """Per-source errors: the library's own and named numerical failures; not bugs."""
    from stepstone.esm.model import EmbeddingSpaceMap

    def singular(self, X):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(EmbeddingSpaceMap, "transform", singular)
    r = _rank(tiny_registry, target_task, tiny_model_dir, method="knn")
    assert len(r) == 0 and len(r.errors) == 4
    assert all(v.startswith("LinAlgError") for v in r.errors.values())

    def nan_map(self, X):
        return np.full_like(X, np.nan)

    monkeypatch.setattr(EmbeddingSpaceMap, "transform", nan_map)
    r = _rank(tiny_registry, target_task, tiny_model_dir, method="knn")
    assert len(r) == 0 and set(r.errors.values()) == {
        "the ESM maps the target's embeddings to NaN or inf"}

    def bug(self, X):
        raise RuntimeError("a bug in the map")

    monkeypatch.setattr(EmbeddingSpaceMap, "transform", bug)
    with pytest.raises(RuntimeError, match="a bug in the map"):
        _rank(tiny_registry, target_task, tiny_model_dir, method="knn")


def test_cli_rank_prints_before_side_files_into_new_folders(tiny_registry, tmp_path,
                                                            tiny_model_dir, capsys, monkeypatch):
    import pandas as pd

    texts, labels = make_texts(40, seed=5)
    pd.DataFrame({"s": texts, "y": labels}).to_csv(tmp_path / "t.csv", index=False)
    argv = ["rank", str(tmp_path / "t.csv"), "--registry", str(tiny_registry),
            "--text-column", "s", "--label-column", "y", "--encoder", str(tiny_model_dir),
            "--no-cache", "--quiet"]
    csv, png = tmp_path / "new" / "deeper" / "r.csv", tmp_path / "plots" / "r.png"
    assert main([*argv, "--csv", str(csv), "--plot", str(png)]) == 0
    assert "Ranking of 4 sources" in capsys.readouterr().out
    assert len(pd.read_csv(csv)) == 4 and png.stat().st_size > 1000

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Ranking, "to_csv", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main([*argv, "--csv", str(tmp_path / "again.csv")])
    assert "Ranking of 4 sources" in capsys.readouterr().out  # shown before the write
