"""Shared fixtures: a tiny random BERT encoder on disk and small tasks."""

from __future__ import annotations

import os
import string

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


@pytest.fixture()
def small_task():
    from stepstone.esm.data import make_task

    texts, labels = make_texts(40)
    return make_task("toy_sentiment", texts, labels, seed=0)
