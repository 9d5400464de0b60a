"""Hub import and export of hf-dataset-selector ESMs, against huggingface_hub's real
on-disk cache in offline mode (no mocks: the test writes refs, blobs and snapshot
symlinks exactly as huggingface_hub lays them out, and huggingface_hub reads them)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save

from stepstone.esm.encoder import EncoderMismatchError, load_encoder
from stepstone.esm.errors import ConfigError
from stepstone.esm.hfselect import import_hfselect, peer_pooling, read_hfselect_esm
from stepstone.esm.hfselect_export import export_hfselect
from stepstone.esm.hub import HubError, find_hub_esms, import_from_hub, push_hfselect
from stepstone.esm.model import ESMConfig, fit_esm
from stepstone.esm.registry import Registry

BASE = "test-org/tiny-bert"
D = 32  # the tiny test encoder's width
# hf-dataset-selector 0.2.1: ESMConfig.__init__'s arguments (hfselect/esmconfig.py), copied
# here so the format check does not depend on stepstone's own list.
PEER_KEYS = {
    "base_model_name", "task_id", "task_subset", "text_column", "label_column", "task_split",
    "num_examples", "seed", "language", "esm_architecture", "esm_embedding_dim",
    "lm_num_epochs", "lm_batch_size", "lm_learning_rate", "lm_weight_decay", "lm_optimizer",
    "esm_num_epochs", "esm_batch_size", "esm_learning_rate", "esm_weight_decay",
    "esm_optimizer", "developers", "version",
}


def _peer_files(task_id: str, *, seed: int, legacy: bool = False, base: str = BASE,
                d: int = D) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """config.json and model.safetensors as hfselect's save_pretrained writes them."""
    gen = torch.Generator().manual_seed(seed)
    w, b = torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen), torch.randn(d, generator=gen)
    prefix = "sequential.0" if legacy else "model"
    config = {k: None for k in PEER_KEYS} | {
        "base_model_name": base, "task_id": task_id, "esm_architecture": "linear",
        "esm_embedding_dim": d, "num_examples": 1000, "lm_learning_rate": 2e-5,
        "version": "0.1.0" if legacy else "0.2.1", "transformers_version": "4.44.0",
        "model_type": "", "architectures": None}
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
             "model.safetensors": save({f"{prefix}.weight": w, f"{prefix}.bias": b})}
    return files, w.numpy(), b.numpy()


def write_cached_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> str:
    """One model repo in huggingface_hub's cache layout: ``refs/main`` holds the commit,
    ``blobs/<etag>`` the bytes (sha256 for LFS files, git's blob sha1 otherwise) and
    ``snapshots/<commit>/<file>`` relative symlinks to them. Returns the commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin")):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (root / "blobs" / etag).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", etag))
    return commit


@pytest.fixture()
def hub_cache(tmp_path):
    """A Hub cache with two good ESM repos (current and legacy format), two broken ones
    (pickled weights only; weights that do not match the config), one ESM of another
    base model and one ordinary model repo."""
    cache = tmp_path / "hub"
    truth = {}
    files, w, b = _peer_files("imdb", seed=1)
    write_cached_repo(cache, "alice/ESM_imdb", files)
    truth["alice/ESM_imdb"] = (w, b)
    files, w, b = _peer_files("ag_news", seed=2, legacy=True)
    write_cached_repo(cache, "bob/ESM_ag_news", files)
    truth["bob/ESM_ag_news"] = (w, b)
    files, _, _ = _peer_files("pickled", seed=3)
    write_cached_repo(cache, "carol/ESM_pickled", {
        "config.json": files["config.json"], "pytorch_model.bin": b"\x80\x04not-read"})
    files, _, _ = _peer_files("wrong_dim", seed=4)
    files["model.safetensors"] = save({"model.weight": torch.zeros(4, 4),
                                       "model.bias": torch.zeros(4)})
    write_cached_repo(cache, "dave/ESM_wrong_dim", files)
    files, _, _ = _peer_files("other", seed=5, base="google-bert/bert-base-uncased", d=8)
    write_cached_repo(cache, "erin/ESM_other_base", files)
    write_cached_repo(cache, "frank/plain-bert", {
        "config.json": json.dumps({"model_type": "bert", "hidden_size": 8}).encode()})
    return cache, truth


GOOD = ["alice/ESM_imdb", "bob/ESM_ag_news"]
BROKEN = ["carol/ESM_pickled", "dave/ESM_wrong_dim"]


def test_offline_discovery_reads_the_cache(hub_cache):
    cache, _ = hub_cache
    assert find_hub_esms(BASE, offline=True, cache_dir=cache) == sorted(GOOD + BROKEN)
    assert find_hub_esms("google-bert/bert-base-uncased", offline=True,
                         cache_dir=cache) == ["erin/ESM_other_base"]
    with pytest.raises(HubError, match="no cache folder.*HF_HUB_CACHE"):
        find_hub_esms(BASE, offline=True, cache_dir=cache / "missing")


def test_import_from_cache_reports_broken_repos_and_resumes(hub_cache, tmp_path,
                                                            tiny_model_dir):
    cache, truth = hub_cache
    encoder = load_encoder(str(tiny_model_dir), max_length=128)
    reg = Registry(tmp_path / "reg", "w", create=True)
    repos = [*find_hub_esms(BASE, offline=True, cache_dir=cache), "erin/ESM_other_base",
             "zed/not-cached"]
    report = import_from_hub(reg, repos, base_model=BASE, encoder=encoder, offline=True,
                             cache_dir=cache, progress=False)
    assert sorted(report.added) == GOOD and report.offline
    assert set(report.failed) == {*BROKEN, "erin/ESM_other_base", "zed/not-cached"}
    assert "pytorch_model.bin" in report.failed["carol/ESM_pickled"]
    assert "does not match esm_embedding_dim" in report.failed["dave/ESM_wrong_dim"]
    assert "not 'test-org/tiny-bert'" in report.failed["erin/ESM_other_base"]
    assert "not in the local Hub cache" in report.failed["zed/not-cached"]
    x = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
    # the peer's pooling for BASE, a BERT model without 'sentence-transformers' in its name
    peer = load_encoder(str(tiny_model_dir), max_length=128, pooling="pooler")
    for repo, esm_id in report.added.items():
        esm = reg.load_esm(esm_id, encoder=peer.identity)
        w, b = truth[repo]
        np.testing.assert_allclose(esm.transform(x), x @ w.T + b, rtol=1e-6, atol=1e-6)
        assert f"hub {repo}@" in esm.config.task_origin
        assert esm.config.encoder["fingerprint"] == encoder.fingerprint
    assert reg.verify().ok
    again = import_from_hub(reg, GOOD, base_model=BASE, offline=True, cache_dir=cache,
                            progress=False)
    assert again.added == {} and sorted(again.skipped) == GOOD and not again.failed


def test_ranking_uses_the_peer_convention_and_refuses_another(hub_cache, tmp_path,
                                                              tiny_model_dir):
    from stepstone.esm.data import make_task
    from stepstone.selection.ranking import rank, registry_encoder
    from tests.conftest import make_texts

    cache, _ = hub_cache
    # BASE names a BERT model without 'sentence-transformers': the peer embeds it with the
    # pooler output, 128 tokens
    given = load_encoder(str(tiny_model_dir), max_length=128)  # its own pooling plays no part
    reg = Registry(tmp_path / "reg", "w", create=True)
    import_from_hub(reg, GOOD, encoder=given, offline=True, cache_dir=cache, progress=False)
    assert {(e.pooling, e.max_length) for e in reg.encoders()} == {("pooler", 128)}
    peer = registry_encoder(reg, str(tiny_model_dir))  # matched by fingerprint
    assert (peer.pooling, peer.max_length) == ("pooler", 128)
    task = make_task("tgt", *make_texts(40, seed=7))
    ranking = rank(task, reg, encoder=peer, cache=False, progress=False, gain=False,
                   check_leakage=False)
    assert sorted(ranking.task_ids) == ["ag_news", "imdb"]
    ranking = rank(task, reg, encoder=str(tiny_model_dir), cache=False, progress=False,
                   gain=False, check_leakage=False)
    assert sorted(ranking.task_ids) == ["ag_news", "imdb"]
    for wrong in ("mean", "cls"):
        other = load_encoder(str(tiny_model_dir), max_length=128, pooling=wrong)
        both = rf"built for .*pooler, max_length 128.*asked for .*{wrong}, max_length 128"
        with pytest.raises(EncoderMismatchError, match=both):
            rank(task, reg, encoder=other, cache=False, progress=False, gain=False,
                 check_leakage=False)


# -- the peer's pooling ---------------------------------------------------------------------
@pytest.mark.parametrize(("name", "model_type", "pooling"), [
    ("sentence-transformers/all-MiniLM-L6-v2", None, "mean"),
    ("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", None, "mean"),
    ("bert-base-multilingual-uncased", None, "pooler"),
    ("google-bert/bert-base-uncased", None, "pooler"),
    ("dbmdz/bert-base-german-cased", None, "pooler"),
    ("distilbert-base-uncased", None, "cls"),
    ("sentence-transformers/msmarco-distilbert-base-v4", None, "cls"),  # not BERT: first token
    ("FacebookAI/roberta-base", None, "cls"),
    ("sentence-transformers/all-distilroberta-v1", None, "cls"),
    ("sentence-transformers/all-mpnet-base-v2", None, None),  # the peer cannot embed MPNet
    ("FacebookAI/xlm-roberta-base", None, None),
    ("albert-base-v2", None, None),
    ("some-org/encoder", None, None),
    ("some-org/encoder", "bert", "pooler"),  # the model type decides the class
    ("sentence-transformers/encoder", "bert", "mean"),
    ("Sentence-Transformers/encoder", "bert", "pooler"),  # the peer's test is case-sensitive
    ("some-org/roberta-like", "bert", "pooler"),
    ("some-org/encoder", "distilbert", "cls"),
    ("some-org/encoder", "mpnet", None),
])
def test_peer_pooling_rule(name, model_type, pooling):
    assert peer_pooling(name, model_type) == pooling


def _peer_folder(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    files, _, _ = _peer_files(f"task-{folder.name}", seed=len(folder.name), base=base)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_folder_imports_record_the_peer_pooling(tmp_path, tiny_model_dir, caplog):
    """Encoders not installed: the pooling comes from the name; a guess, or no answer
    (mean), is said with the peer's rule."""
    reg = Registry(tmp_path / "reg", "w", create=True)
    expected = {
        "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2": ("mean", False),
        "bert-base-multilingual-uncased": ("pooler", False),
        "distilbert-base-uncased": ("cls", False),
        "some-org/roberta-ft": ("cls", True),  # guessed from the name
        "some-org/encoder": ("mean", True),  # cannot be told
    }
    for i, (base, (pooling, warned)) in enumerate(expected.items()):
        caplog.clear()
        with caplog.at_level("WARNING", logger="stepstone.esm.hfselect"):
            entry = import_hfselect(reg, _peer_folder(tmp_path / f"esm{i}", base))
        assert (entry.base_model, entry.pooling, entry.max_length) == (base, pooling, 128)
        assert reg.load_esm(entry.id).config.encoder["pooling"] == pooling
        about = [r.getMessage() for r in caplog.records if "The rule:" in r.getMessage()]
        assert bool(about) == warned, (base, about)
        if warned:
            assert "get_pooled_output" in about[0] and "sentence-transformers" in about[0]
    # a given encoder's model type decides (the tiny test model is a BertModel)
    for i, (base, pooling) in enumerate({"sentence-transformers/tiny": "mean",
                                         "some-org/distilbert-named": "pooler"}.items()):
        given = load_encoder(str(tiny_model_dir), max_length=128, pooling="cls")
        entry = import_hfselect(reg, _peer_folder(tmp_path / f"given{i}", base), encoder=given)
        assert (entry.pooling, entry.fingerprint) == (pooling, given.fingerprint)


def test_hub_imports_record_the_peer_pooling(tmp_path):
    cache = tmp_path / "hub"
    bases = {"me/ESM_st": ("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", "mean"),
             "me/ESM_mbert": ("bert-base-multilingual-uncased", "pooler"),
             "me/ESM_distil": ("distilbert/distilbert-base-uncased", "cls")}
    for i, (repo, (base, _)) in enumerate(bases.items()):
        write_cached_repo(cache, repo, _peer_files(repo, seed=i, base=base)[0])
    reg = Registry(tmp_path / "reg", "w", create=True)
    report = import_from_hub(reg, list(bases), offline=True, cache_dir=cache, progress=False)
    assert sorted(report.added) == sorted(bases) and not report.failed
    for repo, (base, pooling) in bases.items():
        entry = reg.get(report.added[repo])
        assert (entry.base_model, entry.pooling, entry.fingerprint) == (base, pooling, "")


def test_esm_without_fingerprint_still_needs_its_pooling():
    """An ESM whose encoder was not here at import is matched by name, not by name only."""
    from stepstone.esm.encoder import EncoderIdentity

    esm = EncoderIdentity("bert-base-multilingual-uncased", "", "pooler", 128, None, 768)
    same = EncoderIdentity("bert-base-multilingual-uncased", "f00", "pooler", 128, None, 768)
    mean = EncoderIdentity("bert-base-multilingual-uncased", "f00", "mean", 128, None, 768)
    assert esm.matches(same) and esm.mismatches(mean) == ["pooling"]


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_cli_discovers_and_imports_offline_through_env(hub_cache, tmp_path):
    """The real path: HF_HUB_OFFLINE and HF_HUB_CACHE read by huggingface_hub itself."""
    cache, _ = hub_cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "stepstone.cli", "registry", "import-hfselect",
           "--registry", str(tmp_path / "reg"), "--from-hub", "--base-model", BASE,
           "--json", "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr  # two repos failed, the others imported
    result = json.loads(out.stdout)
    assert len(result["added"]) == 2 and sorted(result["failed"]) == BROKEN


# -- export ---------------------------------------------------------------------------------
def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _check_peer_format(folder: Path, *, base: str, d: int) -> None:
    """The files hfselect 0.2.1's ESM.from_pretrained reads, and its card's tags."""
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors",
                                                  "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert PEER_KEYS <= set(config)
    assert config["version"] == "0.2.1" and config["esm_architecture"] == "linear"
    assert config["esm_embedding_dim"] == d and config["base_model_name"] == base
    # hfselect's ESMConfig.__str__ (run while loading) formats these with a width
    assert all(isinstance(config[k], str) and config[k]
               for k in ("task_id", "task_split", "label_column"))
    state = load_file(str(folder / "model.safetensors"))
    assert set(state) == {"model.weight", "model.bias"}
    assert state["model.weight"].shape == (d, d) and state["model.bias"].shape == (d,)
    assert state["model.weight"].dtype == torch.float32
    meta = _front_matter((folder / "README.md").read_text())
    assert "embedding_space_map" in meta["tags"] and f"BaseLM:{base}" in meta["tags"]
    assert meta["base_model"] == base and meta["datasets"] == [config["task_id"]]


def test_export_round_trips_through_the_hub_cache(hub_cache, tmp_path, tiny_model_dir):
    cache, truth = hub_cache
    peer = load_encoder(str(tiny_model_dir), max_length=128)
    reg = Registry(tmp_path / "reg", "w", create=True)
    report = import_from_hub(reg, ["alice/ESM_imdb"], encoder=peer, offline=True,
                             cache_dir=cache, progress=False)
    esm_id = report.added["alice/ESM_imdb"]
    out = export_hfselect(reg, esm_id, tmp_path / "out" / esm_id)
    _check_peer_format(out, base=BASE, d=D)
    card = (out / "README.md").read_text()
    assert esm_id in card and peer.fingerprint in card  # stepstone's provenance
    # Back in through the Hub path: the same map.
    cache2 = tmp_path / "hub2"
    write_cached_repo(cache2, "me/ESM_imdb", {p.name: p.read_bytes() for p in out.iterdir()})
    reg2 = Registry(tmp_path / "reg2", "w", create=True)
    back = import_from_hub(reg2, ["me/ESM_imdb"], offline=True, cache_dir=cache2,
                           progress=False)
    x = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
    w, b = truth["alice/ESM_imdb"]
    np.testing.assert_allclose(reg2.load_esm(back.added["me/ESM_imdb"]).transform(x),
                               x @ w.T + b, rtol=1e-6, atol=1e-6)


def _built(reg: Registry, identity, architecture="linear", **kw) -> str:
    import dataclasses

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, identity.dim)).astype(np.float32)
    cfg = ESMConfig(in_dim=identity.dim, out_dim=identity.dim,
                    encoder=dataclasses.asdict(identity), task_id="src", classes=["a", "b"],
                    finetune={"epochs": 3, "lr": 2e-5, "batch_size": 32, "seed": 0})
    esm = fit_esm(X, X @ rng.normal(size=(identity.dim, identity.dim)).astype(np.float32) + 1,
                  config=cfg, architecture=architecture, **kw)[0]
    return reg.add(esm, esm_id=f"src-{architecture}", settings_key=architecture).id


def test_export_of_built_esms_and_refusals(tmp_path, tiny_model_dir):
    ST = "sentence-transformers/tiny-bert"  # a BERT model the peer mean-pools
    peer = load_encoder(str(tiny_model_dir), max_length=128)
    reg = Registry(tmp_path / "reg", "w", create=True)
    lowrank = _built(reg, peer.identity, "lowrank", rank=4)
    with pytest.raises(ConfigError, match="no Hub id for encoder"):
        export_hfselect(reg, lowrank, tmp_path / "x")
    # the peer pools a BERT model not named sentence-transformers by its pooler output
    with pytest.raises(EncoderMismatchError, match="pooling: ESM 'mean', hfselect 'pooler'"):
        export_hfselect(reg, lowrank, tmp_path / "x", base_model="me/tiny-bert")
    out = export_hfselect(reg, lowrank, tmp_path / "x", base_model=ST)
    _check_peer_format(out, base=ST, d=D)
    assert "Embeddings: mean pooling over the last layer" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["lm_num_epochs"] == 3 and config["stepstone"]["architecture"] == "lowrank"
    x = np.random.default_rng(2).normal(size=(6, D)).astype(np.float32)
    esm, _ = read_hfselect_esm(out)
    np.testing.assert_allclose(esm.transform(x), reg.load_esm(lowrank).transform(x),
                               rtol=1e-5, atol=1e-5)
    from stepstone.esm.model import ESMFitSettings

    mlp = _built(reg, peer.identity, "mlp", hidden_dim=8,
                 settings=ESMFitSettings(method="adamw", epochs=1))
    with pytest.raises(ConfigError, match="linear d→d maps.*mlp"):
        export_hfselect(reg, mlp, tmp_path / "y", base_model=ST)
    short = load_encoder(str(tiny_model_dir), max_length=32)
    reg.add(fit_esm(np.ones((20, D), np.float32), np.ones((20, D), np.float32), config=ESMConfig(
        in_dim=D, out_dim=D, encoder={**short.identity.__dict__}, task_id="s"))[0],
        esm_id="short", settings_key="short")
    with pytest.raises(EncoderMismatchError, match="max_length: ESM 32, hfselect 128"):
        export_hfselect(reg, "short", tmp_path / "z", base_model=ST)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_push_refused_offline(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(HubError, match="lacks"):
        push_hfselect(tmp_path / "f", "me/x")
    for name in ("config.json", "model.safetensors", "README.md"):
        (tmp_path / "f" / name).write_text("{}")
    with pytest.raises(HubError, match="offline mode"):  # conftest sets HF_HUB_OFFLINE=1
        push_hfselect(tmp_path / "f", "me/x")


def test_cli_export(hub_cache, tmp_path, tiny_model_dir, capsys):
    from stepstone.cli import main

    cache, _ = hub_cache
    reg = Registry(tmp_path / "reg", "w", create=True)
    report = import_from_hub(reg, GOOD, encoder=load_encoder(str(tiny_model_dir), max_length=128),
                             offline=True, cache_dir=cache, progress=False)
    ids = sorted(report.added.values())
    assert main(["registry", "export-hfselect", "--registry", str(reg.path), *ids,
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)["exported"]
    for esm_id in ids:
        _check_peer_format(Path(exported[esm_id]), base=BASE, d=D)
    assert main(["registry", "export-hfselect", "--registry", str(reg.path), *ids,
                 "--out", str(tmp_path / "out"), "--push", "me/x"]) == 2
    assert "--push uploads one ESM" in capsys.readouterr().err


PEER_MODEL_UTILS = (Path(__file__).resolve().parents[2] / "benchmarks" / ".envs" / "hfselect"
                    / "hfselect" / "model_utils.py")


@pytest.mark.parametrize(("name", "kind", "pooling"), [
    ("some-org/tiny", "bert", "pooler"),
    ("sentence-transformers/tiny", "bert", "mean"),
    ("some-org/tiny-distil", "distilbert", "cls"),
])
def test_peer_pooling_embeds_as_the_peer_does(tmp_path, tiny_model_dir, name, kind, pooling):
    """Reference: hf-dataset-selector 0.2.1's own get_pooled_output (its model_utils.py,
    which needs only torch and transformers), on input padded as the peer pads it (to 64
    tokens here, not 128: the tiny model has 64 positions)."""
    import importlib.util

    from transformers import AutoModel, AutoTokenizer, DistilBertConfig, DistilBertModel

    from tests.conftest import build_tiny_model

    if not PEER_MODEL_UTILS.is_file():
        pytest.skip("hf-dataset-selector is not installed under benchmarks/.envs/hfselect")
    spec = importlib.util.spec_from_file_location("_peer_model_utils", PEER_MODEL_UTILS)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    folder = tmp_path / name  # the peer decides by the name it loaded the model under
    if kind == "bert":
        build_tiny_model(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        torch.manual_seed(0)
        DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=D, n_layers=1,
                                         n_heads=2, hidden_dim=64)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    assert peer_pooling(str(folder), model.config.model_type) == pooling
    texts = ["good movie", "the food was very bad not ok", "call now to win a free prize"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=64,
                      return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        want = peer.get_pooled_output(model, batch["input_ids"], batch["attention_mask"])
    ours = load_encoder(str(folder), pooling=pooling, max_length=64).embed(texts,
                                                                           progress=False)
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), rtol=1e-5, atol=1e-5)


def test_mpnet_hub_id_is_the_assembled_folder(tmp_path, monkeypatch):
    """The peer's name for all-mpnet-base-v2 resolves to the folder `make mpnet` writes."""
    from stepstone.esm.encoder import MODELS_ENV, resolve_model_path
    from stepstone.esm.identity import same_encoder_name

    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    (tmp_path / "all-mpnet-base-v2").mkdir()
    (tmp_path / "all-mpnet-base-v2" / "config.json").write_text('{"model_type": "mpnet"}')
    hub_id = "sentence-transformers/all-mpnet-base-v2"
    assert resolve_model_path(hub_id) == str(tmp_path / "all-mpnet-base-v2")
    assert same_encoder_name(hub_id, "all-mpnet-base-v2")
