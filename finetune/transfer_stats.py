"""What a transfer report concludes from its numbers: intervals, a verdict, warnings.

- An accuracy measured on ``n`` test examples gets a Wilson score interval (Wilson
  1927); a Pearson r on ``n`` pairs a Fisher z interval.
- The gain (the metric with minus without the intermediate step) gets Newcombe's
  hybrid score interval from those two (Newcombe 1998, Stat. Med. 17:873, method 10;
  for correlations the same MOVER construction, Zou & Donner 2008). It treats the two
  measurements as independent, which is conservative here: both models are scored on
  the same test examples and get many of the same ones right.
- With several seeds the interval is the one of the seed-mean on the ``n`` test
  examples: seeds vary the training, not the test set.
- A model whose test predictions are one constant, or that does no better than always
  predicting the most common class, is named in a warning: its numbers say nothing
  about transfer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054
LEVEL = 0.95
INTERVAL_METHOD = {
    "accuracy": "Wilson score intervals for the accuracies; Newcombe's hybrid score "
                "interval for the gain, which treats the two accuracies as independent and "
                "so is conservative",
    "pearson": "Fisher z intervals for the correlations; the MOVER interval of Zou & "
               "Donner 2008 for the gain, which treats the two as independent and so is "
               "conservative",
}


def wilson_interval(p: float, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n < 1 or not 0 <= p <= 1:
        raise ValueError(f"Need n >= 1 and 0 <= p <= 1; got n={n}, p={p}.")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fisher_interval(r: float, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Fisher z interval of a Pearson correlation ``r`` on ``n`` pairs (n >= 4)."""
    if n < 4 or not -1 <= r <= 1:
        raise ValueError(f"Need n >= 4 and -1 <= r <= 1; got n={n}, r={r}.")
    centre = math.atanh(min(max(r, -1 + 1e-12), 1 - 1e-12))
    half = z / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def metric_interval(metric: str, value: float, n: int) -> tuple[float, float] | None:
    """The test-set interval of ``metric`` (accuracy or pearson); None for other metrics
    or too few examples."""
    if not math.isfinite(value):
        return None
    if metric == "accuracy" and n >= 1:
        return wilson_interval(value, n)
    if metric == "pearson" and n >= 4:
        return fisher_interval(value, n)
    return None


def difference_interval(a: float, a_int: tuple[float, float], b: float,
                        b_int: tuple[float, float]) -> tuple[float, float]:
    """Interval of ``a - b`` from the intervals of ``a`` and ``b`` (MOVER; Newcombe's
    method 10 when both are Wilson intervals)."""
    d = a - b
    return (d - math.hypot(a - a_int[0], b_int[1] - b),
            d + math.hypot(a_int[1] - a, b - b_int[0]))


def gain_verdict(metric: str, target: float, baseline: float, n: int) -> dict[str, Any]:
    """Intervals for ``target``, ``baseline`` and their difference on ``n`` test examples,
    and one sentence of verdict: helped (the gain's interval is above 0), hurt (below
    0) or no measurable effect."""
    gain = target - baseline
    t_int, b_int = metric_interval(metric, target, n), metric_interval(metric, baseline, n)
    out: dict[str, Any] = {"gain": gain, "n": n, "level": LEVEL,
                           "method": INTERVAL_METHOD.get(metric), "target_interval": t_int,
                           "baseline_interval": b_int, "gain_interval": None}
    if t_int is None or b_int is None:
        out["verdict"] = "unknown"
        out["sentence"] = (f"No interval for {metric} on {n} test examples; the gain "
                           f"{gain:+.3f} cannot be told from noise.")
        return out
    low, high = difference_interval(target, t_int, baseline, b_int)
    out["gain_interval"] = (low, high)
    interval = f"95% interval {low:+.3f} to {high:+.3f} on {n} test examples"
    size = f" (about {round(abs(gain) * n)} of {n} examples)" if metric == "accuracy" else ""
    if low > 0:
        out["verdict"] = "helped"
        out["sentence"] = (f"The intermediate step helped: {metric} {gain:+.3f}{size}, "
                           f"{interval}.")
    elif high < 0:
        out["verdict"] = "hurt"
        out["sentence"] = (f"The intermediate step hurt: {metric} {gain:+.3f}{size}, "
                           f"{interval}.")
    else:
        out["verdict"] = "no measurable effect"
        out["sentence"] = (f"No measurable effect: the gain {gain:+.3f}{size} is within "
                           f"the noise of the test set ({interval}, which contains 0).")
    return out


def prediction_profile(outputs: np.ndarray, labels: np.ndarray, label_kind: str
                       ) -> dict[str, Any]:
    """What a model predicted on a test split, to spot a degenerate one.

    outputs: (n, C) logits or (n,) classes (classification), (n,) values (regression);
    labels: (n,) true labels. Classification: number of distinct predicted classes, the
    most predicted class and its share, and the share of the most common true class
    (the accuracy of always predicting it). Regression: the predictions' std.
    """
    outputs = np.asarray(outputs)
    labels = np.asarray(labels)
    if label_kind == "classification":
        pred = outputs.argmax(1) if outputs.ndim == 2 else outputs
        classes, counts = np.unique(pred, return_counts=True)
        _, true_counts = np.unique(labels, return_counts=True)
        return {"n": int(len(pred)), "distinct": int(len(classes)),
                "top_class": int(classes[counts.argmax()]),
                "top_share": float(counts.max() / len(pred)),
                "majority_share": float(true_counts.max() / len(labels))}
    return {"n": int(len(outputs)), "std": float(np.std(outputs))}


def degenerate(profile: dict[str, Any] | None, metric_value: float,
               classes: list[str] | None = None) -> str | None:
    """Why a model with this :func:`prediction_profile` and primary metric is degenerate
    (one constant prediction, or no better than the most common class), or None."""
    if not profile:
        return None
    if "std" in profile:
        return "predicts the same value for every test example" if profile["std"] < 1e-8 \
            else None
    name = profile["top_class"]
    if classes and 0 <= name < len(classes):
        name = classes[name]
    if profile["distinct"] == 1:
        return f"predicts one class ({name!r}) for every test example"
    if metric_value <= profile["majority_share"] + 1e-12:
        return (f"has accuracy {metric_value:.3f}, no better than always predicting the "
                f"most common class ({profile['majority_share']:.3f} of the test set)")
    return None
