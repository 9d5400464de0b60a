"""Shared fixtures: a tiny random BERT encoder on disk and small tasks."""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "good", "great", "fine", "love", "happy", "nice", "bad", "awful", "hate", "sad", "poor",
    "terrible", "the", "a", "movie", "film", "food", "service", "was", "is", "very", "not",
    "ball", "game", "team", "score", "vote", "party", "law", "tax", "free", "win", "prize",
    "call", "now", "meeting", "tomorrow", "see", "you", "ok",
]


def build_tiny_model(folder):
    """Write a 2-layer, 32-dim random BertModel with a small WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *string.digits, *WORDS, *[f"##{c}" for c in string.ascii_lowercase]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run torch on one intra-op thread; yields the default count.

    The test models are tiny and gain nothing from threads, while on a shared, busy CPU
    the threads' spin-waits slow them down by an order of magnitude (an ESM-fit test:
    49 s with the default 2 threads, 3 s with 1, at load average ~6 on 2 cores).
    """
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(1)
    yield default
    torch.set_num_threads(default)


@pytest.fixture(autouse=True)
def _default_threads_when_slow(request, _one_torch_thread):
    """Tests marked ``slow`` (the real encoder) keep torch's default thread count."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import torch

    torch.set_num_threads(_one_torch_thread)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def tiny_encoder(tiny_model_dir):
    from stepstone.esm.encoder import load_encoder

    return load_encoder(str(tiny_model_dir), max_length=32)


class ReachedForward(Exception):
    """Raised by :func:`guard_devices`'s hook once a forward's inputs passed the check."""


def guard_devices(module):
    """Make ``module``'s forward assert that every input tensor is on its weights' device,
    then stop with :class:`ReachedForward` (nothing is computed).

    With the weights on the ``meta`` device, a batch left on the CPU fails the assertion
    without a GPU in sight: the device contract is testable anywhere. Copies of the
    module keep the hook.
    """
    import torch

    def check(mod, args, kwargs):
        device = next(mod.parameters()).device
        for x in [*args, *kwargs.values()]:
            if isinstance(x, torch.Tensor):
                assert x.device == device, f"an input is on {x.device}, the weights on {device}"
        raise ReachedForward

    module.register_forward_pre_hook(check, with_kwargs=True)
    return module


@pytest.fixture()
def meta_encoder(tiny_model_dir):
    """The tiny encoder with its weights on ``meta``, its forward guarded (guard_devices)."""
    from stepstone.esm.encoder import load_encoder

    encoder = load_encoder(str(tiny_model_dir), max_length=32, device="meta")
    guard_devices(encoder.model)
    return encoder


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n short texts from two word pools, labelled 'pos'/'neg' by pool (learnable)."""
    rng = np.random.default_rng(seed)
    pos, neg = WORDS[:6], WORDS[6:12]
    filler = WORDS[12:]
    texts, labels = [], []
    for i in range(n):
        lab = "pos" if i % 2 == 0 else "neg"
        pool = pos if lab == "pos" else neg
        words = list(rng.choice(pool, 2)) + list(rng.choice(filler, rng.integers(2, 8)))
        rng.shuffle(words)
        texts.append(" ".join(words) + f" {i}")
        labels.append(lab)
    return texts, labels


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One 2-CPU local Ray cluster for the whole session; yields (gcs address, crash dir).

    Tests that use it are marked ``ray`` (see :func:`pytest_collection_modifyitems`), so
    ``-m "not ray"`` never starts Ray. They skip only when Ray is not installed
    (``pip install 'stepstone[ray]'``; ``make setup`` installs it). The crash folder
    arms the executor's test-only fault injection (``CRASH_HOOK_ENV``); it does nothing
    unless a test puts a ``<job>.crash-*`` file there.
    """
    import logging

    ray = pytest.importorskip("ray")
    from stepstone.finetune.executor import CRASH_HOOK_ENV

    crash_dir = tmp_path_factory.mktemp("crash-hook")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=256 * 1024 ** 2,
             runtime_env={"env_vars": {CRASH_HOOK_ENV: str(crash_dir),
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield ray.get_runtime_context().gcs_address, crash_dir
    finally:
        ray.shutdown()


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Every test that uses the Ray cluster carries the ``ray`` marker: one rule, so a new
    Ray test cannot slip into ``make test-fast``."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture()
def small_task():
    from stepstone.esm.data import make_task

    texts, labels = make_texts(40)
    return make_task("toy_sentiment", texts, labels, seed=0)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks are scripts, not a package), loaded once
    and registered in sys.modules (dataclasses look their module up while it executes)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_task_csv(path, n: int, seed: int) -> str:
    """A ``text,label`` CSV of ``n`` :func:`make_texts` rows at ``path``; returns the path."""
    import pandas as pd

    texts, labels = make_texts(n, seed=seed)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return str(path)


def die_after_checkpoint(monkeypatch, *, write_number: int = 1, when=None) -> None:
    """Let the real checkpoint writer run, then kill the run (``KeyboardInterrupt``) right
    after its ``write_number``-th write (counting only writes to folders ``when`` accepts)."""
    import stepstone.finetune.train as T

    real = T._write_checkpoint
    writes = []

    def write_then_die(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        if when is None or when(folder):
            writes.append(folder)
            if len(writes) == write_number:
                raise KeyboardInterrupt

    monkeypatch.setattr(T, "_write_checkpoint", write_then_die)


def tiny_transfer_world(root, tiny_model_dir, *, keep_models: bool = False):
    """The tiny transfer setting the golden and interval tests share: the tiny encoder
    (``max_length=32``), a 60-row source CSV with its ESM built into ``root/reg`` and a
    50-row target CSV. Returns ``(encoder, source_csv, target_csv)``."""
    from stepstone.esm.encoder import load_encoder
    from stepstone.finetune.build import BuildSettings, build_registry
    from stepstone.finetune.train import FinetuneSettings

    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    source = write_task_csv(Path(root) / "src.csv", 60, seed=10)
    target = write_task_csv(Path(root) / "target.csv", 50, seed=99)
    build_registry(Path(root) / "reg", [source], encoder=encoder, progress=False,
                   settings=BuildSettings(max_examples=40, max_eval=16, keep_models=keep_models,
                                          finetune=FinetuneSettings(epochs=1, batch_size=8)))
    return encoder, source, target
