"""Layer groups and layer-wise learning-rate distributions (Kenneweg et al. 2024).

A model is split into parameter groups by depth: ``embeddings``, one group per
transformer layer (``layer.0`` ... ``layer.{L-1}``) and ``head`` (pooler, task head
and anything else above the last layer). A *distribution* maps depth to a
learning rate per group:

- ``flat:LR``: every group ``LR``;
- ``llrd:LR,DECAY``: ``LR * DECAY ** (distance from the head)`` (layer-wise decay);
- ``kenneweg``: the combined distribution Kenneweg et al. (arXiv 2404.01317) found
  for 12-layer BERT-base, in 10 groups relative to g0 = 3.3e-6 (see
  :data:`KENNEWEG_RELATIVE`). For an encoder with L layers, layer j (0-based)
  takes the group of BERT-base layer ``floor((j + 0.5) / L * 12)`` - the layer at
  the same relative depth;
- a JSON file ``{"group or regex": LR, ...}``: every key must match at least one
  group and every group must be matched.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from stepstone.esm.encoder import find_layer_list
from stepstone.esm.errors import ConfigError

KENNEWEG_BASE_LR = 3.3e-6
# g0 embeddings, g1 layers 0-1, g2 layer 2, g3 layers 3-4, g4 layer 5, g5 layers 6-7,
# g6 layer 8, g7 layers 9-10, g8 layer 11, g9 heads; relative to g0.
KENNEWEG_RELATIVE = (1.0, 1.32, 0.28, 0.58, 0.86, 0.65, 0.99, 1.12, 0.97, 3.40)
_KENNEWEG_LAYER_GROUP = (1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8)  # BERT-base layer -> group
# Parameters AdamW leaves without weight decay (by name suffix).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class LayerGroups:
    """Parameter names per depth group, bottom to top.

    ``names``: group names (``embeddings``, ``layer.i`` ..., ``head``);
    ``params``: for each group, the parameter names it holds.
    """

    names: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]

    @property
    def num_layers(self) -> int:
        return len(self.names) - 2


def layer_groups(model: nn.Module) -> LayerGroups:
    """Split ``model``'s trainable parameters into embeddings / layers / head groups.

    The transformer layers are found as the ``nn.ModuleList`` with
    ``num_hidden_layers`` entries (no model-class lists); parameters whose name
    contains ``embed``, and those the layers' own container holds outside the layers
    (MPNet's ``encoder.relative_attention_bias``, the position bias every layer
    reads), form ``embeddings``; all the rest is ``head``.
    Every trainable parameter lands in exactly one group.
    """
    backbone = next((m for m in model.modules() if hasattr(m, "config")
                     and hasattr(m.config, "num_hidden_layers")), None)
    if backbone is None:
        raise ValueError("No transformers model with a config inside; cannot find layers.")
    blocks = find_layer_list(backbone)
    block_of = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            block_of[id(p)] = i
    container = next((m for m in backbone.modules()
                      if any(c is blocks for c in m.children())), None)
    shared = {id(p) for p in (container.parameters() if container is not None else ())
              if id(p) not in block_of}
    groups: dict[str, list[str]] = {"embeddings": []}
    groups.update({f"layer.{i}": [] for i in range(len(blocks))})
    groups["head"] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in block_of:
            groups[f"layer.{block_of[id(p)]}"].append(name)
        elif "embed" in name or id(p) in shared:
            groups["embeddings"].append(name)
        else:
            groups["head"].append(name)
    empty = [g for g, names in groups.items() if not names]
    if empty:
        raise ValueError(f"Layer group(s) {empty} hold no trainable parameter.")
    return LayerGroups(tuple(groups), tuple(tuple(v) for v in groups.values()))


def flat(groups: LayerGroups, lr: float) -> dict[str, float]:
    return {g: lr for g in groups.names}


def llrd(groups: LayerGroups, lr: float, decay: float) -> dict[str, float]:
    """``lr * decay ** (distance from the head)``: head ``lr``, last layer ``lr*decay``..."""
    top = len(groups.names) - 1
    return {g: lr * decay ** (top - i) for i, g in enumerate(groups.names)}


def kenneweg(groups: LayerGroups, base_lr: float = KENNEWEG_BASE_LR) -> dict[str, float]:
    """Kenneweg et al.'s combined distribution, mapped by relative depth (module doc)."""
    L = groups.num_layers
    out = {"embeddings": base_lr * KENNEWEG_RELATIVE[0],
           "head": base_lr * KENNEWEG_RELATIVE[9]}
    for j in range(L):
        bert_layer = min(11, math.floor((j + 0.5) / L * 12))
        out[f"layer.{j}"] = base_lr * KENNEWEG_RELATIVE[_KENNEWEG_LAYER_GROUP[bert_layer]]
    return {g: out[g] for g in groups.names}


def from_mapping(groups: LayerGroups, mapping: dict[str, float]) -> dict[str, float]:
    """Per-group LRs from ``{group name or regex: LR}`` (full match on group names)."""
    out: dict[str, float] = {}
    for key, lr in mapping.items():
        pattern = re.compile(key)
        hits = [g for g in groups.names if pattern.fullmatch(g)]
        if not hits:
            raise ConfigError(f"LR key {key!r} matches no layer group; the groups are "
                              f"{list(groups.names)}.")
        for g in hits:
            out[g] = float(lr)
    missing = [g for g in groups.names if g not in out]
    if missing:
        raise ConfigError(f"No learning rate for layer group(s) {missing}.")
    return {g: out[g] for g in groups.names}


_USAGE = "'flat:LR', 'llrd:LR,DECAY', 'kenneweg[:BASE_LR]' or a .json file"
_ARITY = {"flat": (1,), "llrd": (2,), "kenneweg": (0, 1)}


def resolve_distribution(spec: str | Mapping[str, float], groups: LayerGroups
                         ) -> dict[str, float]:
    """Per-group learning rates from a spec: one of :data:`_USAGE`, or a mapping
    ``{group name or regex: LR}`` (as in a JSON file)."""
    if isinstance(spec, Mapping):
        return _check_positive(from_mapping(groups, dict(spec)))
    kind, _, arg = spec.partition(":")
    if kind in _ARITY:
        try:
            numbers = [float(x) for x in arg.split(",")] if arg else []
        except ValueError:
            numbers = None
        if numbers is None or len(numbers) not in _ARITY[kind]:
            raise ConfigError(f"LR distribution must be {_USAGE}; got {spec!r}.")
        if kind == "flat":
            out = flat(groups, *numbers)
        elif kind == "llrd":
            out = llrd(groups, *numbers)
        else:
            out = kenneweg(groups, *numbers)
    elif spec.endswith(".json"):
        if not Path(spec).is_file():
            raise ConfigError(f"No LR distribution file {spec!r}.")
        try:
            mapping = json.loads(Path(spec).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"LR distribution file {spec!r} is not valid JSON: {err}") from None
        if not isinstance(mapping, dict):
            raise ConfigError(f"LR distribution file {spec!r} must hold a JSON object "
                              f"{{group or regex: LR}}; got {type(mapping).__name__}.")
        out = from_mapping(groups, mapping)
    else:
        raise ConfigError(f"LR distribution must be {_USAGE}; got {spec!r}.")
    return _check_positive(out)


def _check_positive(out: dict[str, float]) -> dict[str, float]:
    bad = {g: v for g, v in out.items() if not (v > 0 and math.isfinite(v))}
    if bad:
        raise ConfigError(f"Learning rates must be positive and finite; got {bad}.")
    return out


def param_groups(model: nn.Module, lrs: dict[str, float], groups: LayerGroups | None = None,
                 *, weight_decay: float = 0.01) -> list[dict]:
    """AdamW parameter groups: one per layer group, biases/norms without weight decay."""
    groups = groups or layer_groups(model)
    named = dict(model.named_parameters())
    out = []
    for g, names in zip(groups.names, groups.params, strict=True):
        decay = [named[n] for n in names if not n.endswith(NO_DECAY)]
        no_decay = [named[n] for n in names if n.endswith(NO_DECAY)]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": lrs[g], "weight_decay": wd, "group": g})
    return out
