"""Narrow a registry's ESMs before ranking: conditions on their metadata, include and
exclude lists.

A condition is ``FIELD OP VALUE``:

- ``FIELD``: a registry column (``id``, ``task_id``, ``base_model``, ``architecture``,
  ``num_examples``, ``label_kind``, ``num_classes``, ``in_dim``, ``pooling``,
  ``max_length``, ``layer``, ``created``, ...), one of the short names ``task``,
  ``encoder``, ``examples``, ``classes``, ``dim``, or a dotted path into the ESM's
  recorded config (``finetune.epochs``, ``fit.method``, ``metrics.val_mse``,
  ``task_origin``, ``encoder.fingerprint``);
- ``OP``: ``=`` (``==``), ``!=``, ``<``, ``<=``, ``>``, ``>=`` (numbers when both sides
  are numbers, else text), ``~`` (the value is a regular expression found anywhere,
  case-insensitive) or ``!~`` (not found).

``num_examples>=500``, ``task~review``, ``label_kind=classification``,
``fit.method=ridge``. An ESM that lacks a named config field fails the condition.
Include and exclude patterns are shell globs on the ESM id or its task id
(``sms_spam``, ``imdb*``). Every ESM a filter removes gets one reason naming the rule.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stepstone.esm.errors import ConfigError
from stepstone.esm.registry import Registry, RegistryEntry

__all__ = ["CandidateFilter", "FilterResult", "filter_entries"]

_OPS = (">=", "<=", "!=", "!~", "==", "=", ">", "<", "~")
_COND_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(" + "|".join(map(re.escape, _OPS))
                      + r")\s*(.*?)\s*$")
ALIASES = {"task": "task_id", "encoder": "base_model", "examples": "num_examples",
           "classes": "num_classes", "dim": "in_dim", "arch": "architecture"}
COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RegistryEntry)
                                 if f.name != "task_vector")


@dataclass(frozen=True)
class Condition:
    """One parsed ``FIELD OP VALUE`` condition."""

    field: str
    op: str
    value: str
    text: str

    @classmethod
    def parse(cls, text: str) -> Condition:
        m = _COND_RE.match(text) if isinstance(text, str) else None
        if m is None or m.group(3) == "":
            raise ConfigError(f"A filter condition must read FIELD OP VALUE with OP one of "
                              f"{list(_OPS)} (e.g. 'num_examples>=500', 'task~review'); got "
                              f"{text!r}.")
        name, op, value = m.groups()
        name = ALIASES.get(name, name)
        if "." not in name and name not in COLUMNS and name not in _CONFIG_TOP:
            raise ConfigError(f"Unknown filter field {name!r}; expected a registry column "
                              f"{list(COLUMNS)}, a short name {sorted(ALIASES)}, or a "
                              f"recorded config field ({sorted(_CONFIG_TOP)}, dotted for "
                              "nested ones such as 'fit.method').")
        if op in ("~", "!~"):
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(f"Filter {text!r}: {value!r} is not a regular expression "
                                  f"({err}).") from None
        return cls(name, "=" if op == "==" else op, value, text.strip())

    @property
    def needs_config(self) -> bool:
        return self.field not in COLUMNS

    def holds(self, actual: Any) -> bool:
        """Whether ``actual`` (the ESM's value; ``_MISSING`` when absent) satisfies it."""
        if actual is _MISSING:
            return False
        if self.op in ("~", "!~"):
            found = re.search(self.value, _text(actual), flags=re.IGNORECASE) is not None
            return found if self.op == "~" else not found
        a, b = _number(actual), _number(self.value)
        if a is not None and b is not None:
            left, right = a, b
        else:
            left, right = _text(actual), self.value
            if self.op in ("<", "<=", ">", ">="):
                return False  # no order between a number and a text
        return {"=": left == right, "!=": left != right, "<": left < right,
                "<=": left <= right, ">": left > right, ">=": left >= right}[self.op]


# Top-level ESMConfig fields a condition may name without a dot.
_CONFIG_TOP = frozenset({"task_data_hash", "task_origin", "rank", "hidden_dim", "classes",
                         "created", "format_version", "label_kind", "out_dim", "in_dim"})
_MISSING = object()


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    try:
        out = float(str(value))
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _lookup(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


@dataclass(frozen=True)
class CandidateFilter:
    """Which registry ESMs may be ranked (see the module docstring).

    The CLI's ``--where``, ``--include`` and ``--exclude`` fill these fields (``rank``
    and ``registry list``).
    """

    where: tuple[str, ...] = field(
        default=(), metadata={"help": "Conditions FIELD OP VALUE, all of which must hold "
                                      "(e.g. 'num_examples>=500', 'task~review')."})
    include: tuple[str, ...] = field(
        default=(), metadata={"help": "Keep only ESMs whose id or task id matches one of "
                                      "these globs."})
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "Drop ESMs whose id or task id matches one of these "
                                      "globs."})

    def __post_init__(self) -> None:
        for name in ("where", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"'{name}' must be a sequence of strings; got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "_conditions", tuple(Condition.parse(w) for w in self.where))

    @property
    def conditions(self) -> tuple[Condition, ...]:
        return self._conditions  # type: ignore[attr-defined]

    def __bool__(self) -> bool:
        return bool(self.where or self.include or self.exclude)

    def __str__(self) -> str:
        parts = [f"where {c.text!r}" for c in self.conditions]
        parts += [f"include {list(self.include)}"] if self.include else []
        parts += [f"exclude {list(self.exclude)}"] if self.exclude else []
        return ", ".join(parts) or "no filter"

    def to_dict(self) -> dict[str, list[str]]:
        return {"where": list(self.where), "include": list(self.include),
                "exclude": list(self.exclude)}

    def reason(self, entry: RegistryEntry, config: Callable[[], dict[str, Any]]) -> str | None:
        """Why ``entry`` is filtered out, or None when it stays. ``config``: returns the
        ESM's recorded config as a dict (called only for a condition that needs it)."""
        names = (entry.id, entry.task_id)
        if self.include and not any(fnmatch.fnmatchcase(n, p)
                                    for p in self.include for n in names):
            return f"filtered out: not in --include {list(self.include)}"
        hit = next((p for p in self.exclude if any(fnmatch.fnmatchcase(n, p) for n in names)),
                   None)
        if hit is not None:
            return f"filtered out: --exclude {hit!r}"
        row = entry.to_dict()
        for cond in self.conditions:
            actual = _lookup(config(), cond.field) if cond.needs_config else row[cond.field]
            if not cond.holds(actual):
                shown = "absent" if actual is _MISSING else repr(actual)
                return f"filtered out: --where {cond.text!r} ({cond.field} is {shown})"
        return None


@dataclass
class FilterResult:
    """The ESMs a :class:`CandidateFilter` keeps, and id → reason for the others."""

    kept: list[RegistryEntry]
    filtered: dict[str, str]

    def counts(self) -> dict[str, int]:
        """How many ESMs each rule removed (the rule's part of the reason)."""
        return dict(Counter(why.split(" (")[0] for why in self.filtered.values()))

    def summary(self) -> str:
        """One line: how many were filtered out and by which rule."""
        if not self.filtered:
            return ""
        rules = "; ".join(f"{n} by {rule.removeprefix('filtered out: ')}"
                          for rule, n in self.counts().items())
        return f"{len(self.filtered)} candidate(s) filtered out: {rules}"


def filter_entries(registry: Registry, entries: Sequence[RegistryEntry],
                   filters: CandidateFilter | None) -> FilterResult:
    """Apply ``filters`` to ``entries`` (of ``registry``, whose configs a condition on a
    recorded field reads); keeps their order."""
    if not filters:
        return FilterResult(list(entries), {})
    kept, filtered = [], {}
    for e in entries:
        cache: dict[str, Any] = {}

        def config(e: RegistryEntry = e, cache: dict[str, Any] = cache) -> dict[str, Any]:
            if "c" not in cache:
                cache["c"] = registry.config(e.id).to_dict()
            return cache["c"]

        why = filters.reason(e, config)
        if why is None:
            kept.append(e)
        else:
            filtered[e.id] = why
    return FilterResult(kept, filtered)
