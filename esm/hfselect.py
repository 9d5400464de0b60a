"""Import ESM folders written by hf-dataset-selector (``hfselect``) into a registry.

hfselect stores ``config.json`` (``base_model_name``, ``task_id``, ``task_subset``,
``esm_architecture``, ``esm_embedding_dim``, ``num_examples``, ``lm_*``/``esm_*``
hyper-parameters, ``version``) and ``model.safetensors`` with ``model.weight`` /
``model.bias``, or ``sequential.0.weight`` / ``sequential.0.bias`` for the legacy
v0.1.0 format. Only safetensors weights are read (no pickles).

hfselect embeds texts with a pooling that depends on the base model (mean only for
``sentence-transformers`` BERT models; see :func:`peer_pooling`); an import records that
pooling, so ``rank`` embeds the target the same way against the ESM.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from stepstone.esm.encoder import (
    DEFAULT_MAX_LENGTH,
    Encoder,
    EncoderMismatchError,
    Pooling,
    load_encoder,
    resolve_model_path,
)
from stepstone.esm.model import WEIGHTS_NAME, EmbeddingSpaceMap, ESMConfig, ESMFormatError
from stepstone.esm.registry import Registry, RegistryEntry, check_finite, esm_id_for

logger = logging.getLogger(__name__)

_WEIGHT_KEYS = {
    "current": ("model.weight", "model.bias"),
    "legacy-0.1.0": ("sequential.0.weight", "sequential.0.bias"),
}
_REQUIRED = ("base_model_name", "task_id", "esm_architecture", "esm_embedding_dim")

# -- the peer's embedding convention ------------------------------------------------------
# Followed: hf-dataset-selector 0.2.1, hfselect/model_utils.py, get_pooled_output(base_model,
# input_ids, attention_mask), the one function that embeds texts both for training an ESM
# (embedding_dataset.py, create_embedding_dataset) and for ranking (esm_logme.py,
# compute_scores):
#     isinstance(base_model, BertModel):
#         "sentence-transformers" in base_model.name_or_path -> masked mean of outputs[0]
#         else                                              -> outputs[1] (pooler output)
#     DistilBertModel -> outputs[0][:, 0]      RobertaModel -> outputs[0][:, 0, :]
#     anything else   -> NotImplementedError
# The model comes from AutoModel.from_pretrained(name) (esm_logme.py, compute_task_ranking),
# so its class follows config.model_type; transformers maps only the types 'bert',
# 'distilbert' and 'roberta' to those classes (XLMRobertaModel, CamembertModel, MPNetModel
# are none of them). The ESM records that very name (create_embedding_dataset:
# base_model_name = base_model.config.name_or_path), and the substring test is
# case-sensitive. Texts are padded to and truncated at 128 tokens (dataset.py,
# Dataset.collate_fn, max_length=128, no token type ids); embeddings are not normalised.
_PEER_POOLING_RULE = ("hf-dataset-selector 0.2.1 (hfselect/model_utils.py, get_pooled_output) "
                      "pools BERT by the mean when the name holds 'sentence-transformers', "
                      "else by the pooler output; DistilBERT and RoBERTa by the first token; "
                      "it cannot embed other model types")
_PEER_TYPE_POOLING: dict[str, Pooling] = {"distilbert": "cls", "roberta": "cls"}
# The model types of the names in hfselect/model_utils.py MODELS (its pretrained_name
# entries) and of their current Hub names (the Hub redirects the old ones).
_KNOWN_MODEL_TYPES = {
    "bert-base-uncased": "bert",
    "google-bert/bert-base-uncased": "bert",
    "bert-base-multilingual-uncased": "bert",
    "google-bert/bert-base-multilingual-uncased": "bert",
    "prajjwal1/bert-tiny": "bert",
    "roberta-base": "roberta",
    "FacebookAI/roberta-base": "roberta",
    "distilbert-base-uncased": "distilbert",
    "distilbert/distilbert-base-uncased": "distilbert",
    "sentence-transformers/all-mpnet-base-v2": "mpnet",
    "sentence-transformers/all-MiniLM-L6-v2": "bert",
    "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2": "bert",
}


def _known_model_type(name: str) -> str | None:
    return next((t for n, t in _KNOWN_MODEL_TYPES.items() if n.casefold() == name.casefold()),
                None)


def model_type_from_name(name: str) -> str | None:
    """The ``config.model_type`` a Hub id most likely loads as, or None when the name does
    not tell: the names hf-dataset-selector knows exactly, else ``distilbert``,
    ``xlm-roberta``, ``roberta``, ``mpnet`` in the name's last part, or ``bert`` as a word
    of it (``bert-base-german-cased``, not ``albert-base-v2`` nor ``camembert-base``)."""
    known = _known_model_type(name)
    if known is not None:
        return known
    last = name.rstrip("/").rsplit("/", 1)[-1].casefold()
    for word, model_type in (("distilbert", "distilbert"), ("xlm-roberta", "xlm-roberta"),
                             ("xlm_roberta", "xlm-roberta"), ("roberta", "roberta"),
                             ("mpnet", "mpnet")):
        if word in last:
            return model_type
    return "bert" if re.search(r"(?:^|[-_.])bert(?:[-_.]|$)", last) else None


def peer_pooling(base_model_name: str, model_type: str | None = None) -> Pooling | None:
    """The stepstone pooling that reproduces how hf-dataset-selector 0.2.1 embeds texts
    with the encoder ``base_model_name`` (the name its ESMs record), or None when that
    cannot be told or the peer cannot embed that model.

    The peer's rule (``hfselect/model_utils.py``, ``get_pooled_output``): a BERT model is
    mean-pooled when its name holds ``sentence-transformers`` (case-sensitive), else
    pooled by its pooler output (``'pooler'``); DistilBERT and RoBERTa take the first
    token (``'cls'``); any other model type (MPNet, XLM-R, ...) raises there. Always 128
    tokens, not normalised.

    ``model_type``: the encoder's ``config.model_type``, which decides the class the
    peer's ``AutoModel`` loads; None guesses it from the name
    (:func:`model_type_from_name`).
    """
    model_type = model_type or model_type_from_name(base_model_name)
    if model_type == "bert":
        return "mean" if "sentence-transformers" in base_model_name else "pooler"
    return _PEER_TYPE_POOLING.get(model_type or "")


def read_hfselect_esm(folder: str | Path) -> tuple[EmbeddingSpaceMap, str]:
    """Convert one hfselect ESM folder; returns the ESM and its settings key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ESMFormatError(f"{str(folder)!r} is not an hfselect ESM folder: no config.json.")
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise ESMFormatError(f"{str(folder)!r} has no {WEIGHTS_NAME} (found {found}); pickled "
                             "weights (pytorch_model.bin) are not read.")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ESMFormatError(f"{config_path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ESMFormatError(f"{config_path} must hold a JSON object; got a "
                             f"{type(data).__name__}.")
    missing = [k for k in _REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise ESMFormatError(f"hfselect config {config_path} lacks {missing}; it has "
                             f"{sorted(data)}.")
    if data["esm_architecture"] != "linear":
        raise ESMFormatError(f"Only linear hfselect ESMs exist; got architecture "
                             f"{data['esm_architecture']!r} in {config_path}.")
    try:
        state = load_file(str(weights))
    except SafetensorError as err:
        raise ESMFormatError(f"{weights} is not readable safetensors ({err}).") from None
    for _fmt, (w_key, b_key) in _WEIGHT_KEYS.items():
        if w_key in state and b_key in state:
            break
    else:
        raise ESMFormatError(f"{weights} holds {sorted(state)}; expected {_WEIGHT_KEYS['current']} "
                             f"or legacy {_WEIGHT_KEYS['legacy-0.1.0']}.")
    try:
        dim = int(data["esm_embedding_dim"])
    except (TypeError, ValueError):
        raise ESMFormatError(f"{config_path}: esm_embedding_dim must be an integer; got "
                             f"{data['esm_embedding_dim']!r}.") from None
    if tuple(state[w_key].shape) != (dim, dim) or tuple(state[b_key].shape) != (dim,):
        raise ESMFormatError(f"{weights}: weight shape {tuple(state[w_key].shape)} does not "
                             f"match esm_embedding_dim={dim} (or bias shape "
                             f"{tuple(state[b_key].shape)} does not); expected ({dim}, {dim}) "
                             f"and ({dim},).")
    task_id = data["task_id"] + (f":{data['task_subset']}" if data.get("task_subset") else "")
    config = ESMConfig(
        architecture="linear", in_dim=dim, out_dim=dim,
        # hfselect records no weights fingerprint and pads to 128 tokens; import_hfselect
        # records the fingerprint when the encoder is installed (identify_encoder), else it
        # is matched by name (see stepstone.esm.encoder.EncoderIdentity.mismatches). The
        # pooling is the peer's for that name; identify_encoder settles it by model type.
        encoder={"name": data["base_model_name"], "fingerprint": "",
                 "pooling": peer_pooling(data["base_model_name"]) or "mean",
                 "max_length": DEFAULT_MAX_LENGTH, "layer": None},
        task_id=task_id, task_origin=f"hfselect {data.get('version', '?')}: {folder}",
        task_spec=_hub_spec(data),
        num_examples=int(data.get("num_examples") or 0),
        finetune={k[3:]: v for k, v in data.items() if k.startswith("lm_")},
        fit={k[4:]: v for k, v in data.items() if k.startswith("esm_") and
             k not in ("esm_architecture", "esm_embedding_dim")},
    )
    esm = EmbeddingSpaceMap(config)
    with torch.no_grad():
        esm.linear.weight.copy_(state[w_key])
        esm.linear.bias.copy_(state[b_key])
    check_finite(esm, what=f"hfselect ESM {str(folder)!r}")
    digest = hashlib.sha256(config_path.read_bytes() + weights.read_bytes()).hexdigest()
    return esm.eval(), digest


def _hub_spec(data: dict) -> dict:
    """The Hub dataset an hfselect ESM was trained on, as a recorded task spec
    (:func:`stepstone.esm.specs.load_recorded`)."""
    spec = {"hub": data["task_id"], "config": data.get("task_subset") or None}
    text = data.get("text_column")
    if isinstance(text, str) and text:
        spec["text_column"] = text.split(",") if "," in text else text
    if isinstance(data.get("label_column"), str) and data["label_column"]:
        spec["label_column"] = data["label_column"]
    if isinstance(data.get("task_split"), str) and data["task_split"]:
        spec["train_split"] = data["task_split"]
    return spec


@functools.lru_cache(maxsize=4)
def _local_fingerprint(local: str) -> tuple[str, int, str | None]:
    """(weights fingerprint, dim, model type) of an installed encoder, loaded once per
    process; the pooling it is loaded with does not change any of them."""
    encoder = load_encoder(local, pooling="mean", max_length=DEFAULT_MAX_LENGTH)
    return encoder.fingerprint, encoder.dim, _model_type(encoder)


def _model_type(encoder: Encoder) -> str | None:
    return getattr(getattr(encoder.model, "config", None), "model_type", None) or None


def _record_peer_pooling(esm: EmbeddingSpaceMap, model_type: str | None) -> None:
    """Record on ``esm`` the pooling the peer embeds its encoder with (:func:`peer_pooling`);
    ``model_type`` is that encoder's, None when it is not here. A warning naming the
    peer's rule when the model type is only guessed from the name, and mean pooling with
    one when the peer's pooling cannot be told."""
    cfg = esm.config
    name = cfg.encoder["name"]
    known = model_type or _known_model_type(name)
    guessed = known or model_type_from_name(name)
    pooling = peer_pooling(name, guessed)
    if known is None:
        why = (f"encoder {name!r} is not here and its name does not tell its model type"
               if guessed is None else
               f"encoder {name!r} is not here; its model type is guessed from the name "
               f"({guessed!r})")
    elif pooling is None:
        why = f"the peer cannot embed encoder {name!r} (model type {known!r})"
    else:
        why = None
    if why is not None:
        logger.warning(
            "hfselect ESM %r: %s; recorded %r pooling%s. The rule: %s. Import it with its "
            "encoder given (--encoder) or installed to decide by the encoder's model type.",
            cfg.task_id, why, pooling or "mean",
            ", which may not be what the ESM was trained with" if pooling is None else "",
            _PEER_POOLING_RULE)
    cfg.encoder = {**cfg.encoder, "pooling": pooling or "mean"}


def identify_encoder(esm: EmbeddingSpaceMap, *, encoder: Encoder | None = None) -> bool:
    """Record the weights fingerprint of the encoder an imported ESM was trained on, and
    the pooling the peer embeds with it (:func:`peer_pooling`).

    hfselect records a Hub id only. When ``encoder`` is given (the user says which
    local encoder it is), or the id is a known alias of an installed model package
    (:mod:`stepstone.esm.identity`), an installed package or a model folder, that
    encoder's fingerprint is recorded, so the ESM matches it by weights, and its model
    type decides the pooling (the given encoder's own pooling plays no part). Otherwise a
    warning says that it matches no installed encoder (``rank`` then lists it as
    skipped), and the pooling is decided from the name. Returns whether a fingerprint
    was recorded. Never touches the Hub.

    Raises
    ------
    EncoderMismatchError
        When the encoder's dimension is not the ESM's.
    """
    cfg = esm.config
    name = cfg.encoder["name"]
    if encoder is not None:
        fingerprint, dim, what = encoder.fingerprint, encoder.dim, repr(encoder.name)
        model_type = _model_type(encoder)
    else:
        # an installed package, a model folder, or a known alias of one; never the Hub
        resolved = resolve_model_path(name)
        local = resolved if Path(resolved).is_dir() else None
        if local is None:
            _record_peer_pooling(esm, None)
            logger.warning(
                "hfselect ESM %r records encoder %r, which matches no installed encoder (no "
                "installed package, model folder or known alias of one); `rank` lists it as "
                "skipped until that encoder is given (--encoder) or its package installed.",
                cfg.task_id, name)
            return False
        (fingerprint, dim, model_type), what = (_local_fingerprint(local),
                                                f"{name!r} (installed as {local!r})")
    if dim != cfg.in_dim:
        raise EncoderMismatchError(
            f"hfselect ESM {cfg.task_id!r} maps {cfg.in_dim}-d embeddings of {name!r}; the "
            f"encoder {what} makes {dim}-d ones.")
    cfg.encoder = {**cfg.encoder, "fingerprint": fingerprint}
    _record_peer_pooling(esm, model_type)
    return True


def import_hfselect(registry: Registry, folder: str | Path, *,
                    encoder: Encoder | None = None) -> RegistryEntry | None:
    """Import one hfselect ESM folder; returns None when it was imported before.

    The encoder it was trained on is identified by :func:`identify_encoder` (its
    weights fingerprint is recorded when it is installed, or given as ``encoder``).
    """
    esm, key = read_hfselect_esm(folder)
    if registry.find(key) is not None:
        return None
    identify_encoder(esm, encoder=encoder)
    return registry.add(esm, esm_id=esm_id_for(esm.config.task_id, key), settings_key=key)
