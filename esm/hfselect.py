"""Import ESM folders written by hf-dataset-selector (``hfselect``) into a registry.

hfselect stores ``config.json`` (``base_model_name``, ``task_id``, ``task_subset``,
``esm_architecture``, ``esm_embedding_dim``, ``num_examples``, ``lm_*``/``esm_*``
hyper-parameters, ``version``) and ``model.safetensors`` with ``model.weight`` /
``model.bias``, or ``sequential.0.weight`` / ``sequential.0.bias`` for the legacy
v0.1.0 format. Only safetensors weights are read (no pickles).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from stepstone.esm.encoder import DEFAULT_MAX_LENGTH
from stepstone.esm.model import WEIGHTS_NAME, EmbeddingSpaceMap, ESMConfig, ESMFormatError
from stepstone.esm.registry import Registry, RegistryEntry, check_finite, esm_id_for

logger = logging.getLogger(__name__)

_WEIGHT_KEYS = {
    "current": ("model.weight", "model.bias"),
    "legacy-0.1.0": ("sequential.0.weight", "sequential.0.bias"),
}
_REQUIRED = ("base_model_name", "task_id", "esm_architecture", "esm_embedding_dim")


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
        # hfselect records no weights fingerprint and pads to 128 tokens; the encoder is
        # matched by name (see stepstone.esm.encoder.EncoderIdentity.mismatches).
        encoder={"name": data["base_model_name"], "fingerprint": "", "pooling": "mean",
                 "max_length": DEFAULT_MAX_LENGTH, "layer": None},
        task_id=task_id, task_origin=f"hfselect {data.get('version', '?')}: {folder}",
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


def import_hfselect(registry: Registry, folder: str | Path) -> RegistryEntry | None:
    """Import one hfselect ESM folder; returns None when it was imported before."""
    esm, key = read_hfselect_esm(folder)
    if registry.find(key) is not None:
        return None
    return registry.add(esm, esm_id=esm_id_for(esm.config.task_id, key), settings_key=key)
