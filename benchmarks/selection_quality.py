"""Selection quality: how well each ranking method picks intermediate tasks.

Reads the ground-truth transfer matrix (``transfer_matrix.jsonl``, written by
``transfer_matrix.py``) and, per target T, ranks the other tasks as sources with
each method, then compares the ranking with the measured performances.

Definitions (per target T; perf = the target test metric, accuracy by default,
mean over the seeds; perf_none(T) = T fine-tuned without an intermediate step); the
metrics and the ground-truth loader are ``stepstone.selection.metrics``:

* regret@k = 100 * (best - best_topk) / best, with
  best = max(max_S perf(S, T), perf_none(T)) and best_topk = the largest perf(S, T)
  among the method's k top-ranked sources. Schulte et al. (EMNLP 2024) normalise
  by the best source, as we read them; here ``best`` also counts "no intermediate
  step" (the issue's definition), so a method whose every pick hurts is charged
  against plain fine-tuning. The top-k choice itself never falls back to "no
  intermediate step". ``regret_src@k`` (in the JSON) is the variant with
  best = max_S perf(S, T) only.
* NDCG@5 (sklearn ``ndcg_score``) of the method's order, relevance = perf(S, T) -
  min_S perf(S, T) (>= 0; all-equal relevances count as a perfect 1.0).
* Spearman correlation between the method's order and the true gains
  perf(S, T) - perf_none(T).

Every metric scores the order ``rank()`` returns (ties broken by task id), which
is what a user gets. Three references need no model: ``random`` is the exact
expectation over uniformly random orders (``random_regret_at_k``; not a sample), the
fixed alphabetical order (which is also what base-embedding LogME gives, one score
for every source, so that row is not repeated), and the "popular source" prior, which
ranks sources by how they transferred to the *other* targets (leave-one-target-out).
Every mean has a 95% percentile-bootstrap interval over targets; ``p vs random`` and
``p vs esm-logme`` are two-sided paired sign-flip permutation tests of the per-target
values (exact for up to 16 targets). A v2 protocol's ESM fit variants (the paper's
AdamW fit beside the closed-form ridge fit) are rows of their own, scored from the
ESMs the runner exported next to the results. The ``esm-logme prefilter-K`` rows rank
on the registry that ships (``transfer_matrix.py ship``) with ``rank(prefilter=K)``: the
ESM sketch index's first and middle stage keep K sources, exact ESM-LogME orders them;
what that pruning costs in selection is their difference to the ``esm-logme`` row
(regret@k past K is not defined for them). Regression targets are scored by Pearson
correlation (they have no accuracy). Cost columns: milliseconds of ``rank()``'s
scoring stage per source per target (median over ``--repeats``; the target's
embedding, shared by all sources, is in its own column; 0 for methods that need
none), and bytes on disk per source (the ESM's config.json + model.safetensors; the
kept model for ``source-logme``; the task vector for ``textemb``; the word profile
for ``vocab``).

Seed noise of the ground truth: the std of a cell across seeds (mean over cells),
and the regret@k of a split-seed oracle that ranks by one seed's measured
performances and is scored on another seed's (mean over ordered seed pairs).
A method's regret within that oracle's regret is inside the noise.

The method scores are cached in ``selection_quality_scores.json`` next to the
results, so regenerating the table and plots from the committed files needs no
model (seconds). ``--recompute`` scores again from the runner's work registries
(``benchmarks/work/matrix/<protocol key>/``), and first builds the two ESM
variants that need no fine-tuning: low-rank ESMs fitted from the kept seed-0
source models (``registry-lowrank``) and the linear ESMs stored in float16
(``registry-fp16``; loaded back into float32 for scoring).

The ``kernel (eNTK)`` row (issue 7) is not scored here: ``kernel_transfer.py``
writes its per-pair scores to ``kernel_transfer.jsonl`` (minutes per target), and
the table takes every target whose sources are all scored (``--kernel-results``).

    python benchmarks/selection_quality.py                # table + plots from the cache
    python benchmarks/selection_quality.py --recompute    # rescore (needs the work dir)
    python benchmarks/selection_quality.py --results benchmarks/results/transfer_matrix_v2.jsonl \
        --tasks all --out benchmarks/results/quality_v2   # the v2 ground truth (pool)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stepstone.esm.atomic import write_text_atomic
from stepstone.selection.gain_fit import restrict_rows
from stepstone.selection.metrics import (
    GroundTruth,
    bootstrap_ci,
    load_ground_truth,
    ndcg_at_k,
    paired_permutation_test,
    random_ndcg_at_k,
    random_regret_at_k,
    regret_at_k,
    spearman_gain,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
KS = (1, 3, 5)
# rank(prefilter=K) rows: what the first stage in front of exact ESM-LogME costs in
# selection (issue 16), on the registry that ships
DEFAULT_PREFILTERS = (5, 10)
RANDOM = "random (exact expectation)"
FIXED = "fixed order (alphabetical)"
POPULAR = "popular source (LOTO)"
REFERENCE = "esm-logme"

logger = logging.getLogger("selection_quality")


def _kernel_module():
    """benchmarks/kernel_transfer.py (the eNTK row's pair scores)."""
    return _script_module("kernel_transfer")


def _matrix_module():
    """benchmarks/transfer_matrix.py."""
    return _script_module("transfer_matrix")


def _script_module(name: str):
    """benchmarks/NAME.py (benchmarks are scripts, not a package)."""
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


# -- methods ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: a ``rank()`` method on one of the work registries."""

    name: str
    method: str
    registry: str = "s0"  # registry-s0, -s1, -lowrank, -fp16, -shipped, -<fit variant>
    layer: int | None = None
    approx_rank: int | None = None
    prefilter: int | None = None  # rank(prefilter=K): only the K kept are ordered
    note: str = ""


def methods(protocol: dict[str, Any], *, approx_rank: int, lowrank: int,
            have_s1: bool, variants: tuple[str, ...] = (),
            prefilters: tuple[int, ...] = ()) -> list[Method]:
    exit_layer = protocol.get("exit_layer")
    out = [
        Method("esm-logme", "esm-logme", note="linear ESMs, exact (Schulte et al. 2024)"),
        Method(f"esm-logme approx-{approx_rank}", "esm-logme", approx_rank=approx_rank,
               note=f"target's top {approx_rank} principal directions"),
        Method(f"esm-logme lowrank-{lowrank}", "esm-logme", registry="lowrank",
               note=f"rank-{lowrank} residual ESMs fitted from the kept seed-0 models"),
        Method("esm-logme fp16", "esm-logme", registry="fp16",
               note="linear ESMs stored in float16"),
    ]
    if exit_layer:
        out.append(Method(f"esm-logme exit-L{exit_layer}", "esm-logme", layer=exit_layer,
                          note=f"early exit after layer {exit_layer} (Kang et al. 2021)"))
    out += [Method(f"esm-logme prefilter-{k}", "esm-logme", registry="shipped", prefilter=k,
                   note=f"the shipped registry's ESM sketch index keeps {k} (first and "
                        "middle stage), exact ESM-LogME orders them; metrics past "
                        f"{k} sources are n/a")
            for k in prefilters]
    if have_s1:
        out.append(Method("esm-logme seed-1 ESMs", "esm-logme", registry="s1",
                          note="ESMs of the seed-1 source models (ESM-side noise)"))
    out += [
        Method("knn", "knn", note="leave-one-out 5-NN accuracy of ESM-mapped embeddings"),
        Method("source-logme", "source-logme",
               note="LogME with each real fine-tuned source model (what ESMs approximate)"),
        Method("textemb", "textemb", note="cosine of mean base embeddings (Vu et al. 2020)"),
        Method("vocab", "vocab", note="share of the target's frequent words in the source's"),
    ]
    for variant in variants:
        out.insert(1, Method(f"esm-logme ({variant} fit)", "esm-logme", registry=variant,
                             note=f"the same source models' ESMs fitted with {variant}"
                                  + (" (the paper's fit)" if variant == "adamw" else "")))
    return out


def _folder_bytes(folder: Path, names: tuple[str, ...] | None = None) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()] if names is None \
        else [folder / n for n in names if (folder / n).is_file()]
    return sum(p.stat().st_size for p in files)


def bytes_per_source(method: Method, reg, entries) -> float:
    from stepstone.esm.model import CONFIG_NAME, WEIGHTS_NAME
    from stepstone.esm.registry import PROFILE_NAME

    sizes = []
    for e in entries:
        if method.method in ("esm-logme", "knn"):
            sizes.append(_folder_bytes(reg.esm_dir(e.id), (CONFIG_NAME, WEIGHTS_NAME)))
        elif method.method == "source-logme":
            folder = reg.model_dir(e.id)
            sizes.append(_folder_bytes(folder) if folder is not None else 0)
        elif method.method == "textemb":
            sizes.append(0 if e.task_vector is None else e.task_vector.nbytes)
        elif method.method == "vocab":
            sizes.append(_folder_bytes(reg.esm_dir(e.id), (PROFILE_NAME,)))
        else:
            sizes.append(0)
    return float(np.mean(sizes)) if sizes else 0.0


# -- variant registries (no extra fine-tuning) -------------------------------------------------
def build_variants(work: Path, gt: GroundTruth, encoder, *, lowrank: int, cache=None,
                   exports: Path | None = None, variants: tuple[str, ...] = (),
                   progress: bool = False) -> None:
    """registry-lowrank and registry-fp16 from registry-s0, registry-shipped (its
    full-depth ESMs as ``transfer_matrix.py ship`` writes them), and a registry-<fit> for
    each of the protocol's ESM fit ``variants`` (e.g. the paper's adamw fit) from the
    runner's exported seed-0 ESMs under ``exports`` (task vectors and word profiles
    from the registry-s0 entry of the same id). Resumable: keyed by the source entry's
    settings key."""
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.model import EmbeddingSpaceMap, fit_esm
    from stepstone.esm.registry import Registry
    from stepstone.esm.specs import load_task

    s0 = Registry(work / "registry-s0")
    low = Registry(work / "registry-lowrank", "w", create=True)
    half = Registry(work / "registry-fp16", "w", create=True)
    proto = gt.protocol
    rank_ = min(lowrank, encoder.dim)
    for e in s0.entries():
        if not e.encoder_identity.matches(encoder.identity) or e.task_id not in gt.specs:
            continue  # early-exit ESMs have no variants here; nor sources left out (--tasks)
        profile = s0.profile(e.id)
        fp16_key = f"fp16-{e.settings_key}"
        if half.find(fp16_key) is None:
            esm = s0.load_esm(e.id).half()
            half.add(esm, esm_id=f"{e.id}-fp16", settings_key=fp16_key,
                     task_vector=e.task_vector, profile=profile)
        low_key = f"lowrank{rank_}-{e.settings_key}"
        if low.find(low_key) is None and e.has_model:
            task = load_task(gt.specs[e.task_id]).subsample(
                max_train=proto["source_max_examples"], max_test=proto["source_max_eval"],
                seed=0)  # the seed-0 build's source sample
            inputs = task.train.inputs()
            X = encoder.embed(inputs, cache=cache, progress=progress)
            kept = load_encoder(str(s0.model_dir(e.id) / "encoder"), pooling=encoder.pooling,
                                max_length=encoder.max_length)
            Y = kept.embed(inputs, progress=progress)
            esm, _ = fit_esm(X, Y, architecture="lowrank", rank=rank_,
                             config=s0.config(e.id))
            low.add(esm, esm_id=f"{e.id}-lowrank{rank_}", settings_key=low_key,
                    task_vector=e.task_vector, profile=profile)
    for variant in variants:
        with Registry(work / f"registry-{variant}", "w", create=True) as reg:
            for e in s0.entries():
                folder = None if exports is None else exports / "s0" / variant / e.id
                if folder is None or not folder.is_dir():
                    raise FileNotFoundError(f"No exported {variant} ESM {folder} for "
                                            f"{e.id}; the runner writes one per source.")
                key = f"{variant}-{e.settings_key}"
                if reg.find(key) is None:
                    reg.add(EmbeddingSpaceMap.load(folder), esm_id=f"{e.id}-{variant}",
                            settings_key=key, task_vector=e.task_vector,
                            profile=s0.profile(e.id))
    for reg in (s0, low, half):
        reg.close()
    # what ships: the full-depth seed-0 ESMs of these tasks (written afresh, atomically:
    # an earlier table may have scored other tasks)
    _matrix_module().ship(out=work / "registry-shipped", protocol_key=gt.protocol_key,
                          tasks=[gt.specs[t] for t in gt.tasks], work=work.parent)


# -- scoring ----------------------------------------------------------------------------------
def compute_scores(gt: GroundTruth, work: Path, *, approx_rank: int = 64, lowrank: int = 32,
                   repeats: int = 3, exports: Path | None = None,
                   prefilters: tuple[int, ...] = DEFAULT_PREFILTERS,
                   partial: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Rank every target with every method; the orders, timings and sizes (the cache).

    ``partial``: a file that holds what is done so far, written after each method
    (atomically); a rerun with the same protocol, targets and method settings takes
    the methods found there instead of scoring them again (the full table takes about
    an hour here, more than what is left of a session at times)."""
    from tqdm.auto import tqdm

    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.filters import CandidateFilter
    from stepstone.esm.registry import Registry
    from stepstone.selection.ranking import rank

    proto = gt.protocol
    work = Path(work)
    if not (work / "registry-s0").is_dir():
        raise FileNotFoundError(f"No {work / 'registry-s0'}: --recompute needs the runner's "
                                "work folder (run transfer_matrix.py there first).")
    encoder = _matrix_module().protocol_encoder(proto)
    variants = tuple(v.strip() for v in (proto.get("esm_variants") or "").split(",")
                     if v.strip())
    complete = {"lowrank", "fp16", "shipped", *variants}  # built below from registry-s0
    for name in ("s0", "s1"):
        folder = work / f"registry-{name}"
        if not folder.is_dir():
            continue
        with Registry(folder) as reg:
            have = {e.task_id for e in reg.entries() if e.has_model}
        missing = sorted(set(gt.tasks) - have)
        if missing and name == "s0":
            raise RuntimeError(f"{folder} lacks the sources {missing} (a sharded run?); run "
                               "`transfer_matrix.py run --seeds 0` on this machine first.")
        if missing:
            logger.warning("%s lacks the sources %s; leaving out the seed-1 ESM row.", folder,
                           missing)
        else:
            complete.add(name)
    cache = EmbeddingCache(work.parent / "cache")
    build_variants(work, gt, encoder, lowrank=lowrank, cache=cache, exports=exports,
                   variants=variants, progress=progress)
    regs = {name: Registry(work / f"registry-{name}") for name in sorted(complete)}
    targets = gt.targets()
    tasks = target_tasks(gt)
    table = methods(proto, approx_rank=approx_rank, lowrank=lowrank, have_s1="s1" in regs,
                    variants=variants, prefilters=tuple(prefilters))
    out: dict[str, Any] = {"protocol_key": gt.protocol_key, "targets": targets,
                           "repeats": repeats, "methods": {}, "embed_seconds": {}}
    earlier = json.loads(partial.read_text()) if partial is not None and partial.exists() \
        else {}
    if {k: earlier.get(k) for k in ("protocol_key", "targets", "repeats")} != \
            {k: out[k] for k in ("protocol_key", "targets", "repeats")}:
        earlier = {}  # another table's: start afresh
    elif earlier.get("methods"):
        logger.info("Resuming: %d method(s) already scored in %s.", len(earlier["methods"]),
                    partial)
    out["embed_seconds"] = earlier.get("embed_seconds", {})
    # Target embedding cost, shared by every source: uncached, once per target and depth.
    for layer in sorted({m.layer for m in table}, key=lambda x: x or 0):
        if str(layer or "full") in out["embed_seconds"]:
            continue
        enc = encoder if layer is None else encoder.with_layer(layer)
        secs = []
        for t in targets:
            t0 = time.perf_counter()
            enc.embed(tasks[t].train.inputs(), progress=False)
            secs.append(time.perf_counter() - t0)
        out["embed_seconds"][str(layer or "full")] = dict(zip(targets, secs, strict=True))
    bar = tqdm(total=len(table) * len(targets), desc="ranking", unit="rank",
               disable=not progress)
    for m in table:
        done = earlier.get("methods", {}).get(m.name)
        if done is not None and done["spec"] == dataclasses.asdict(m):
            out["methods"][m.name] = done
            bar.update(len(targets))
            continue
        reg = regs[m.registry]
        per_target = {}
        for t in targets:
            times = []
            for _ in range(1 if m.method == "source-logme" else repeats):
                # the target's own task is never a source, also where its data hash
                # (of the subsample) does not match its ESM's: a first stage must not
                # spend a slot on it
                r = rank(tasks[t], reg, m.method, encoder=encoder, layer=m.layer,
                         approx_rank=m.approx_rank, prefilter=m.prefilter,
                         max_examples=None, cache=cache, exclude_target=True,
                         filters=CandidateFilter(exclude=(t,)), progress=False)
                if r.errors:
                    raise RuntimeError(f"{m.name} on {t}: sources failed: {r.errors}")
                # a first stage's time counts, spread over every candidate it saw
                times.append(r.timings["score"] + (r.timings["prefilter"] if m.prefilter
                                                   else 0.0))
            cands = len(gt.mean_perf(t)) if m.prefilter else r.settings["candidates"]
            layer_entries = [e for e in reg.entries() if e.task_id in r.task_ids
                             and e.encoder_identity.layer == m.layer]
            per_target[t] = {
                "orders": [r.task_ids], "candidates": cands,
                "ms_per_source": 1000 * statistics.median(times) / max(cands, 1),
                "bytes_per_source": bytes_per_source(m, reg, layer_entries),
            }
            bar.update(1)
        out["methods"][m.name] = {"spec": dataclasses.asdict(m), "per_target": per_target}
        if partial is not None:
            write_text_atomic(partial, json.dumps(out, indent=1) + "\n")
    bar.close()
    for reg in regs.values():
        reg.close()
    cache.close()
    return out


def target_tasks(gt: GroundTruth) -> dict[str, Any]:
    """Every target's task as the matrix fine-tuned it (the protocol's subsample)."""
    from stepstone.esm.specs import load_task

    p = gt.protocol
    return {t: load_task(gt.specs[t]).subsample(max_train=p["target_max_train"],
                                                max_test=p["target_max_test"],
                                                seed=p["data_seed"]) for t in gt.targets()}


def update_build_spread(gt: GroundTruth, scores: dict[str, Any], work: Path) -> bool:
    """Score the build spread into ``scores['build_spread']`` when the runner's work
    folder has a seed-1 build of two or more sources that the cached entry does not
    cover yet (the seed-1 part usually finishes after the table was scored). Returns
    whether it changed anything; without the work folder it leaves the cache alone."""
    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.registry import Registry

    folders = {b: work / f"registry-{b}" for b in ("s0", "s1")}
    if not all(f.is_dir() for f in folders.values()):
        return False
    with Registry(folders["s1"]) as reg:
        sources = sorted({e.task_id for e in reg.entries() if e.has_model} & set(gt.tasks))
    if len(sources) < 2 or scores.get("build_spread", {}).get("sources") == sources:
        return False
    encoder = _matrix_module().protocol_encoder(gt.protocol)
    cache = EmbeddingCache(work.parent / "cache")
    try:
        with Registry(folders["s0"]) as s0, Registry(folders["s1"]) as s1:
            scored = build_spread_scores(target_tasks(gt), {"s0": s0, "s1": s1}, sources,
                                         encoder=encoder, cache=cache)
    finally:
        cache.close()
    scores["build_spread"] = {"sources": sources, "scores": scored}
    return True


def build_spread_scores(tasks: dict[str, Any], regs: dict[str, Any], sources: list[str], *,
                        encoder, cache) -> dict[str, dict[str, dict[str, float]]]:
    """ESM-LogME of every target on the sources built twice (seed 0 and seed 1: their own
    fine-tuning and ESM fit), with each build's full-depth ESMs:
    {target: {build: {source: score}}}. The target's own task is left out."""
    from stepstone.esm.filters import CandidateFilter
    from stepstone.selection.ranking import rank

    out: dict[str, dict[str, dict[str, float]]] = {}
    for t, task in tasks.items():
        keep = tuple(s for s in sources if s != t)
        if len(keep) < 2:
            continue
        out[t] = {}
        for name, reg in regs.items():
            r = rank(task, reg, "esm-logme", encoder=encoder, max_examples=None, cache=cache,
                     exclude_target=True, gain=False,
                     filters=CandidateFilter(include=keep, exclude=(t,)), progress=False)
            if r.errors or set(r.task_ids) != set(keep):
                raise RuntimeError(f"build spread on {t}, {name}: scored {r.task_ids} of "
                                   f"{list(keep)} ({r.errors or r.skipped})")
            out[t][name] = {row.task_id: float(row.score) for row in r.rows}
    return out


def build_spread(gt: GroundTruth, spread: dict[str, dict[str, dict[str, float]]]
                 ) -> dict[str, Any]:
    """How much ESM-LogME moves between two independent builds of the same sources.

    Per target, over the sources built twice: Kendall tau between the builds' scores,
    whether their top-1 agree, each build's regret@1 (over those sources and no
    intermediate step, seed-mean ground truth), and the builds' score differences
    against the spread of scores across sources (std of the differences / std of the
    seed-0 scores: 0 means the build does not matter, 1.4 that it is as large as the
    differences between sources)."""
    from scipy.stats import kendalltau

    per_target = {}
    for t, builds in sorted(spread.items()):
        if t not in gt.targets():
            continue
        perf_all = gt.mean_perf(t)
        srcs = sorted(set(builds["s0"]) & set(builds["s1"]) & set(perf_all))
        if len(srcs) < 2:
            continue
        a = np.array([builds["s0"][s] for s in srcs])
        b = np.array([builds["s1"][s] for s in srcs])
        perf = {s: perf_all[s] for s in srcs}
        orders = {k: sorted(srcs, key=lambda s, v=builds[k]: (-v[s], s)) for k in ("s0", "s1")}
        per_target[t] = {
            "sources": len(srcs),
            "kendall_tau": float(kendalltau(a, b)[0]) if np.ptp(a) and np.ptp(b) else float("nan"),
            "same_top1": float(orders["s0"][0] == orders["s1"][0]),
            "regret@1 s0": regret_at_k(perf, orders["s0"], 1, baseline=gt.mean_base(t)),
            "regret@1 s1": regret_at_k(perf, orders["s1"], 1, baseline=gt.mean_base(t)),
            "diff_to_spread": float(np.std(a - b) / np.std(a)) if np.std(a) else float("nan"),
        }
    if not per_target:
        return {}
    ts = sorted(per_target)
    summary = {k: _stat([per_target[t][k] for t in ts]) for k in per_target[ts[0]]
               if k != "sources"}
    summary["p_regret@1 s0 vs s1"] = paired_permutation_test(
        [per_target[t]["regret@1 s0"] for t in ts], [per_target[t]["regret@1 s1"] for t in ts])
    return {"targets": ts, "sources": sorted({s for t in ts for s in spread[t]["s1"]}),
            "per_target": per_target, "summary": summary}


def build_spread_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    return (
        f"\nBuild-to-build spread: the {len(result['sources'])} sources built twice "
        f"(seed 0 and seed 1: their own fine-tuning and ESM fit; "
        f"{', '.join(result['sources'])}), ranked by ESM-LogME with each build's ESMs on "
        f"{len(result['targets'])} targets (each without its own task). Kendall tau between "
        f"the builds {_fmt(s['kendall_tau'])}; same top-1 on {_fmt(s['same_top1'])} of the "
        f"targets; regret@1 over these sources {_fmt(s['regret@1 s0'])} (seed-0 build) vs "
        f"{_fmt(s['regret@1 s1'])} (seed-1 build), p = {s['p_regret@1 s0 vs s1']:.3f}; the "
        f"builds' score differences are {_fmt(s['diff_to_spread'])} × the spread of scores "
        f"across sources (std ratio).\n")


# -- evaluation and outputs ------------------------------------------------------------------
def prior_orders(gt: GroundTruth) -> dict[str, dict[str, list[str]]]:
    """Two orders that look at no data of the target: a fixed alphabetical order, and
    the "popular source" prior, which ranks sources by how well they transferred to the
    *other* targets (mean over those targets of the source's gain percentile among the
    target's sources; percentiles keep regression targets, scored by Pearson, on the
    same scale). The target's own cells never enter its order (leave-one-target-out).
    Returns {name: {target: order}}."""
    targets = gt.targets()
    pct: dict[str, dict[str, float]] = {}
    for t in targets:
        perf = gt.mean_perf(t)
        ranks = _average_ranks([perf[s] for s in sorted(perf)])
        pct[t] = {s: (r - 1) / max(len(perf) - 1, 1) for s, r in zip(sorted(perf), ranks,
                                                                      strict=True)}
    fixed, popular = {}, {}
    for t in targets:
        sources = sorted(pct[t])
        fixed[t] = sources
        elsewhere = {s: [pct[u][s] for u in targets if u != t and s in pct[u]]
                     for s in sources}
        popular[t] = sorted(sources, key=lambda s, e=elsewhere: (
            -(float(np.mean(e[s])) if e[s] else -1.0), s))
    return {FIXED: fixed, POPULAR: popular}


def _average_ranks(values: list[float]) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values)  # 1 = smallest; ties share their mean rank


METRICS = (*(f"regret@{k}" for k in KS), "ndcg@5", "spearman")


def _order_metrics(perf: dict[str, float], order: list[str], base: float, *,
                   kept: int | None = None) -> dict[str, float]:
    """The metrics of one order; ``kept``: the order holds only the K sources a first
    stage kept (``rank(prefilter=K)``), so regret@k for k > K, NDCG@5 for K < 5 and the
    Spearman correlation (of the whole order) are not defined (nan)."""
    nan = float("nan")
    if kept is not None:  # the pruned sources after the kept: NDCG@5's ideal is over all
        order = list(order) + sorted(set(perf) - set(order))
    k_max = max(KS) if kept is None else kept
    row = {f"regret@{k}": regret_at_k(perf, order, k, baseline=base) if k <= k_max else nan
           for k in KS}
    row.update({f"regret_src@{k}": regret_at_k(perf, order, k) if k <= k_max else nan
                for k in KS})
    row["ndcg@5"] = ndcg_at_k(perf, order, 5) if kept is None or kept >= 5 else nan
    row["spearman"] = spearman_gain(perf, order, base) if kept is None else nan
    return row


def _random_metrics(perf: dict[str, float], base: float) -> dict[str, float]:
    """The exact expectation over uniformly random orders (Spearman's is 0)."""
    row = {f"regret@{k}": random_regret_at_k(perf, k, baseline=base) for k in KS}
    row.update({f"regret_src@{k}": random_regret_at_k(perf, k) for k in KS})
    row["ndcg@5"] = random_ndcg_at_k(perf, 5)
    row["spearman"] = 0.0 if len(set(perf.values())) > 1 else float("nan")
    return row


def _stat(values: list[float]) -> dict[str, Any]:
    v = [x for x in values if np.isfinite(x)]
    lo, hi = bootstrap_ci(v)
    return {"mean": float(np.mean(v)) if v else float("nan"),
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
            "n": len(v), "ci95": [lo, hi]}


def _paired_p(per_target: dict[str, dict], other: dict[str, dict], metric: str) -> float:
    common = sorted(set(per_target) & set(other))
    if not any(np.isfinite(per_target[t][metric]) for t in common):
        return float("nan")  # not defined for this method (a pruned order's regret@k > K)
    return paired_permutation_test([per_target[t][metric] for t in common],
                                   [other[t][metric] for t in common])


def evaluate(gt: GroundTruth, scores: dict[str, Any], *,
             targets: list[str] | None = None) -> dict[str, Any]:
    """Per-target and summary metrics of every method against the ground truth.

    The cached rankings, the two priors of :func:`prior_orders`, and random orders by
    their exact expectation. Every summary metric has a mean, std, n and a 95%
    percentile-bootstrap interval over targets; ``p_vs_random`` and ``p_vs_esm_logme``
    are two-sided paired sign-flip permutation tests of the per-target values.
    ``targets``: evaluate on these targets only (default: every target); the popular-
    source prior still learns from every other target's cells.
    """
    keep = set(gt.targets() if targets is None else targets)
    targets = [t for t in gt.targets() if t in keep]
    missing = [t for t in targets if t not in scores["targets"]]
    if missing:
        raise ValueError(f"The score cache has no rankings for targets {missing}; rerun with "
                         f"--recompute.")
    orders = {name: {t: m["per_target"][t]["orders"] for t in targets
                     if t in m["per_target"]}  # kernel: maybe a subset
              for name, m in scores["methods"].items()
              # old caches: random orders (replaced by the exact expectation) and base
              # LogME (one score for all: its order is the alphabetical tie-break)
              if name not in ("random", "logme (base)")}
    orders.update({name: {t: [o] for t, o in per.items()}
                   for name, per in prior_orders(gt).items()})
    per_method: dict[str, dict[str, dict]] = {}
    for name, by_target in orders.items():
        per_target = {}
        spec = scores["methods"][name]["spec"] if name in scores["methods"] else {}
        for t, cached in by_target.items():
            if t not in keep:
                continue
            perf, base = gt.mean_perf(t), gt.mean_base(t)
            rows = [_order_metrics(perf, order, base, kept=spec.get("prefilter"))
                    for order in cached]
            per_target[t] = {k: float(np.nanmean([r[k] for r in rows]))
                             if any(np.isfinite(r[k]) for r in rows) else float("nan")
                             for k in rows[0]}
            per_target[t]["top1"] = cached[0][0]
        per_method[name] = per_target
    per_method[RANDOM] = {t: _random_metrics(gt.mean_perf(t), gt.mean_base(t))
                          for t in targets}
    notes = {FIXED: "sources in alphabetical order (the tie-break of equal scores)",
             POPULAR: "sources by mean gain percentile on the other targets (LOTO)",
             RANDOM: "exact expectation over uniformly random orders"}
    out: dict[str, Any] = {}
    for name, per_target in per_method.items():
        m = scores["methods"].get(name)
        m_targets = [t for t in targets if t in per_target]
        if not m_targets:  # e.g. the eNTK row, scored on other targets only
            continue
        entry: dict[str, Any] = {
            "note": m["spec"]["note"] if m else notes[name],
            "per_target": per_target,
            **{k: _stat([per_target[t][k] for t in m_targets])
               for k in per_target[m_targets[0]] if k != "top1"},
            "p_vs_random": {k: _paired_p(per_target, per_method[RANDOM], k)
                            for k in METRICS if name != RANDOM},
            "p_vs_esm_logme": {k: _paired_p(per_target, per_method[REFERENCE], k)
                               for k in METRICS if name != REFERENCE}
            if REFERENCE in per_method else {},
            "ms_per_source": 0.0, "embed_ms_per_target": 0.0, "bytes_per_source": 0.0,
        }
        if m is not None:
            layer = m["spec"]["layer"]
            embed = scores["embed_seconds"].get(str(layer or "full"), {})
            no_embed = ("vocab", "source-logme", "kernel")
            entry.update({
                "ms_per_source": float(np.mean([m["per_target"][t]["ms_per_source"]
                                                for t in m_targets])),
                "embed_ms_per_target": float(1000 * np.mean([embed[t] for t in m_targets]))
                if embed and m["spec"]["method"] not in no_embed
                else 0.0,  # these need no base embedding of the target
                "bytes_per_source": float(np.mean([m["per_target"][t]["bytes_per_source"]
                                                   for t in m_targets])),
            })
        out[name] = entry
    return out


def _fmt(stat: dict[str, Any], digits: int = 2) -> str:
    if not np.isfinite(stat["mean"]):
        return "n/a"
    lo, hi = stat.get("ci95", (float("nan"), float("nan")))
    if not np.isfinite(lo):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _fmt_p(p: dict[str, float]) -> str:
    if not p:
        return "—"
    return " / ".join(f"{p[f'regret@{k}']:.3f}" if np.isfinite(p[f"regret@{k}"]) else "n/a"
                      for k in KS)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _method_table(quality: dict[str, Any]) -> list[str]:
    lines = [
        "| method | regret@1 | regret@3 | regret@5 | p vs random | p vs esm-logme "
        "| NDCG@5 | Spearman (gain) | ms / source / target | target embed ms "
        "| bytes / source |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, q in quality.items():
        lines.append(
            f"| {name} | {_fmt(q['regret@1'])} | {_fmt(q['regret@3'])} | {_fmt(q['regret@5'])}"
            f" | {_fmt_p(q['p_vs_random'])} | {_fmt_p(q['p_vs_esm_logme'])}"
            f" | {_fmt(q['ndcg@5'], 3)} | {_fmt(q['spearman'], 3)} | {q['ms_per_source']:.2f}"
            f" | {q['embed_ms_per_target']:.0f} | {_fmt_bytes(q['bytes_per_source'])} |")
    return lines


def baseline_markdown(checks: dict[str, dict[str, Any]], margin: float) -> str:
    """The pre-registered check per target: each seed's no-intermediate baseline, the
    majority-class floor, the margin and whether the target enters the headline."""
    seeds = sorted({int(s) for c in checks.values() for s in c["seeds"]})
    lines = [f"| target | {' | '.join(f'baseline seed {s}' for s in seeds)} | floor | margin "
             f"| learns (≥ {margin:g}) |",
             "|---|" + "---|" * len(seeds) + "---|---|---|"]
    for t, c in sorted(checks.items()):
        per = {int(k): v for k, v in c["seeds"].items()}
        lines.append(f"| {t} | " + " | ".join(f"{per[s]:.3f}" if s in per else "—"
                                               for s in seeds)
                     + f" | {c['floor']:.3f} | {c['margin']:+.3f} | "
                     + ("yes" if c["learns"] else "**no**") + " |")
    return "\n".join(lines) + "\n"


def markdown(gt: GroundTruth, quality: dict[str, Any], noise: dict[str, Any], *,
             headline: dict[str, Any] | None = None) -> str:
    """The table over every target; with ``headline`` (the pre-registered subset of
    targets whose baseline learns, and its own evaluation) that table first."""
    p = gt.protocol
    lines = [
        f"Protocol `{gt.protocol_key}` ({p['encoder']}): sources ≤ {p['source_max_examples']}"
        f" train, targets {p['target_max_train']} train / ≤ {p['target_max_test']} test, "
        f"lr {p.get('target_lr', p['lr']):g}, {p.get('target_epochs', p['epochs'])} target "
        f"epochs, batch {p['batch_size']}; seeds {gt.seeds}; {len(gt.targets())} targets; "
        f"metric: target test {gt.metric}"
        + (f" ({', '.join(sorted(gt.target_metrics))}: "
           f"{', '.join(sorted(set(gt.target_metrics.values())))})" if gt.target_metrics
           else "")
        + ". Mean over targets [95% bootstrap interval]; p: two-sided paired sign-flip "
        "permutation test over targets (regret@1 / @3 / @5).",
        "",
    ]
    if headline is not None:
        out = sorted(set(gt.targets()) - set(headline["targets"]))
        rule = f"pre-registered: {headline['rule']}"
        if not out:
            lines += [f"Every target's no-intermediate baseline learns ({rule}): the table "
                      "is the headline.", ""]
        elif not headline["targets"]:
            lines += [f"No target's no-intermediate baseline learns ({rule}): there are "
                      "no headline numbers.", ""]
        else:
            lines += [
                f"**Headline: the {len(headline['targets'])} targets whose no-intermediate "
                f"baseline learns** ({rule}; left out: {', '.join(out)}).",
                "", *_method_table(headline["methods"]), "",
                f"**All {len(gt.targets())} targets:**", ""]
    lines += _method_table(quality)
    lines += ["", *[f"- {name}: {q['note']}" for name, q in quality.items()]]
    o = noise["split_seed_oracle"]
    lines += [
        "",
        f"Ground-truth seed noise: a cell's {gt.metric} varies by "
        f"{noise['cell_std']:.4f} (std across seeds, mean over cells); a split-seed oracle "
        f"(rank by one seed's measurements, score on another's) has regret@1/3/5 = "
        f"{o['regret@1']:.2f} / {o['regret@3']:.2f} / {o['regret@5']:.2f}. Differences "
        "between methods smaller than these are inside the noise.",
        f"Transfer gains: {noise['positive_share']:.0%} of (source, target) cells beat "
        f"fine-tuning on the target alone; mean gain {100 * noise['mean_gain']:+.2f} points, "
        f"best per target {100 * noise['mean_best_gain']:+.2f} points on average.",
    ]
    return "\n".join(lines) + "\n"


def plot_gains(gt: GroundTruth, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = 100 * gt.gains()
    n = len(gt.tasks)
    lim = float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 1.0
    fig, ax = plt.subplots(figsize=(0.6 * n + 3, 0.5 * n + 2))
    im = ax.imshow(np.ma.masked_invalid(g), cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(n), gt.tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), gt.tasks, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source (intermediate task)")
    for i in range(n):
        for j in range(n):
            if np.isfinite(g[i, j]):
                ax.text(j, i, f"{g[i, j]:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label=f"gain ({gt.metric} points)", shrink=0.8)
    ax.set_title(f"Target {gt.metric} gain over no intermediate step\n(mean over seeds "
                 f"{gt.seeds}, protocol {gt.protocol_key})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_regret(quality: dict[str, Any], noise: dict[str, Any], path: Path, *,
                subtitle: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, q) in enumerate(quality.items()):
        style = "-" if name.startswith("esm-logme") else "--"
        means = [q[f"regret@{k}"]["mean"] for k in KS]
        color = colors[i % len(colors)]
        ax.plot(KS, means, style, marker="o", label=name, color=color,
                lw=2.4 if name in (REFERENCE, RANDOM) else 1.2)
        if name in (REFERENCE, RANDOM, POPULAR):  # 95% bootstrap intervals over targets
            ci = np.array([q[f"regret@{k}"]["ci95"] for k in KS]).T
            ax.fill_between(KS, ci[0], ci[1], color=color, alpha=0.12)
    o = noise["split_seed_oracle"]
    ax.plot(KS, [o[f"regret@{k}"] for k in KS], ":", color="black", lw=2,
            label="split-seed oracle (noise floor)")
    ax.set_xticks(KS, [f"@{k}" for k in KS])
    ax.set_xlabel("k (sources tried)")
    ax.set_ylabel("regret@k (mean over targets, lower is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Selection regret by method (bands: 95% bootstrap intervals over targets)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def esm_fits(exports: Path, *, seed: int = 0) -> list[dict[str, Any]]:
    """Per exported ESM of ``seed`` (every fit, every depth): held-out MSE of the fit and
    of the identity map, and the share of the fine-tuning shift the fit captures, read
    from the ESMs' configs (no model needed)."""
    out = []
    root = Path(exports) / f"s{seed}"
    for fit_dir in sorted(p for p in root.glob("*") if p.is_dir()):
        for folder in sorted(p for p in fit_dir.iterdir() if p.is_dir()):
            cfg = json.loads((folder / "config.json").read_text())
            m = cfg.get("metrics", {})
            out.append({"source": cfg["task_id"], "fit": fit_dir.name, "esm_id": folder.name,
                        "layer": cfg["encoder"].get("layer"),
                        "val_mse": m.get("val_mse"), "identity_val_mse": m.get("identity_val_mse"),
                        "shift_captured": m.get("shift_captured"),
                        "source_test_accuracy": m.get("source_test_accuracy"),
                        "steps": cfg.get("finetune", {}).get("steps")})
    return out


def esm_fits_markdown(fits: list[dict[str, Any]]) -> str:
    """One row per source and depth: each fit's held-out MSE and shift captured beside
    the identity map's MSE."""
    by: dict[tuple, dict[str, dict]] = {}
    for f in fits:
        by.setdefault((f["source"], f["layer"]), {})[f["fit"]] = f
    fit_names = sorted({f["fit"] for f in fits})
    lines = ["| source | depth | source test acc. | identity val MSE | "
             + " | ".join(f"{n} val MSE (shift captured)" for n in fit_names) + " |",
             "|---|---|---|---|" + "---|" * len(fit_names)]
    for (src, layer), per in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        any_fit = next(iter(per.values()))
        acc = any_fit["source_test_accuracy"]
        cells = []
        for n in fit_names:
            f = per.get(n)
            cells.append("—" if f is None or f["val_mse"] is None else
                         f"{f['val_mse']:.4f} ({100 * f['shift_captured']:.0f} %)")
        lines.append(f"| {src} | {'full' if layer is None else f'layer {layer}'} | "
                     + (f"{acc:.3f}" if acc is not None else "—") + " | "
                     + (f"{any_fit['identity_val_mse']:.4f}"
                        if any_fit["identity_val_mse"] is not None else "—")
                     + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def regenerate(*, results: str | Path, out: str | Path, work: str | Path | None = None,
               recompute: bool = False, protocol_key: str | None = None,
               tasks: str | list[str] | None = None,
               kernel_results: str | Path | None = None,
               metric: str = "accuracy", approx_rank: int = 64, lowrank: int = 32,
               repeats: int = 3, prefilters: tuple[int, ...] = DEFAULT_PREFILTERS,
               progress: bool = True) -> dict[str, Any]:
    """Compute the table and plots; returns the JSON summary that is also written."""
    tm = _matrix_module()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = tm.read_rows(results)
    if tasks is not None:
        rows = restrict_rows(rows, tasks)
    gt = load_ground_truth(rows, protocol_key=protocol_key, metric=metric)
    cache_path = out / "selection_quality_scores.json"
    scores = json.loads(cache_path.read_text()) if cache_path.exists() else None
    if scores is not None and scores.get("protocol_key") != gt.protocol_key:
        logger.warning("The score cache is for protocol %s, not %s; recomputing.",
                       scores.get("protocol_key"), gt.protocol_key)
        scores = None
    if recompute or scores is None or set(gt.targets()) - set(scores["targets"]):
        work = Path(work) if work is not None else tm.WORK_DIR
        partial = out / "selection_quality_scores.partial.json"
        scores = compute_scores(gt, work / gt.protocol_key, approx_rank=approx_rank,
                                lowrank=lowrank, repeats=repeats, prefilters=prefilters,
                                partial=partial,
                                progress=progress,
                                exports=tm.esm_export_dir(Path(results), gt.protocol_key))
        # not sort_keys: the methods' order is the table's order
        write_text_atomic(cache_path, json.dumps(scores, indent=1) + "\n")
        partial.unlink(missing_ok=True)
    work_dir = (Path(work) if work is not None else tm.WORK_DIR) / gt.protocol_key
    if update_build_spread(gt, scores, work_dir):
        write_text_atomic(cache_path, json.dumps(scores, indent=1) + "\n")
    kernel = _kernel_module().method_entry(
        _kernel_module().read_pairs(kernel_results),
        {t: sorted(gt.mean_perf(t)) for t in gt.targets()}) \
        if kernel_results is not None and Path(kernel_results).exists() else None
    if kernel is not None:  # scored by kernel_transfer.py, not cached here
        scores = {**scores, "methods": {**scores["methods"], "kernel (eNTK)": kernel}}
    quality = evaluate(gt, scores)
    # v2 rows carry the majority-class floor: the pre-registered headline is the targets
    # whose baseline clears it by LEARNS_MARGIN on every seed; every target is reported too
    checks = {t: c for t, c in tm.baseline_check(rows).items() if t in set(gt.targets())}
    headline = None
    if checks:
        learns = [t for t in gt.targets() if checks.get(t, {}).get("learns", False)]
        headline = {"rule": f"baseline macro-F1 − majority-class macro-F1 ≥ "
                            f"{tm.LEARNS_MARGIN:g} on every seed (regression: Pearson ≥ "
                            f"{2 * tm.LEARNS_MARGIN:g})",
                    "targets": learns,
                    "methods": evaluate(gt, scores, targets=learns) if learns else {}}
    g = gt.gains()
    noise = {"cell_std": gt.cell_std(), "split_seed_oracle": gt.split_seed_oracle(KS),
             "positive_share": float(np.mean(g[np.isfinite(g)] > 0))
             if np.isfinite(g).any() else 0.0,
             "mean_gain": float(np.nanmean(g)),
             "mean_best_gain": float(np.nanmean(np.nanmax(g, axis=0)))}
    summary = {"protocol_key": gt.protocol_key, "protocol": gt.protocol, "metric": metric,
               "seeds": gt.seeds, "tasks": gt.tasks, "targets": gt.targets(),
               "definitions": {"regret@k": "100*(best-best_topk)/best, best incl. no "
                               "intermediate step", "regret_src@k": "best over sources only",
                               "ndcg@5": "relevance perf-min(perf)",
                               "spearman": "order vs. gains"},
               "ground_truth": {"perf": {t: gt.mean_perf(t) for t in gt.tasks},
                                "baseline": {t: gt.mean_base(t) for t in gt.tasks}},
               "noise": noise, "methods": quality}
    if headline is not None:
        summary.update({"headline": headline, "baselines": checks})
    spread = build_spread(gt, scores.get("build_spread", {}).get("scores", {}))
    if spread:
        summary["build_spread"] = spread
    (out / "selection_quality.json").write_text(
        json.dumps(summary, indent=1, sort_keys=True, default=float) + "\n")
    table = markdown(gt, quality, noise, headline=headline)
    if spread:
        table += build_spread_markdown(spread)
    if checks:
        table += ("\nNo-intermediate baseline per target (macro-F1; regression: Pearson) "
                  "against the majority-class floor:\n\n"
                  + baseline_markdown(checks, tm.LEARNS_MARGIN))
    # issue 15: the gain model's recommendation, leave-one-target-out ('' without the
    # per-target scores that `stepstone gain fit --scores` writes for this protocol)
    table += _script_module("recommend_quality").section(
        results, RESULTS_DIR / f"gain_scores_{gt.protocol_key}.json",
        quality=out / "selection_quality.json", protocol_key=gt.protocol_key, metric=metric,
        tasks=tasks)
    (out / "selection_quality.md").write_text(table)
    exports = tm.esm_export_dir(Path(results), gt.protocol_key)
    if exports.is_dir():  # v2: every source's ESM fit against the identity map
        fits = esm_fits(exports)
        summary["esm_fits"] = fits
        (out / "esm_fits.md").write_text(esm_fits_markdown(fits))
        (out / "selection_quality.json").write_text(
            json.dumps(summary, indent=1, sort_keys=True, default=float) + "\n")
    plot_gains(gt, out / "transfer_matrix_gains.png")
    split = headline is not None and 0 < len(headline["targets"]) < len(gt.targets())
    plot_regret(headline["methods"] if split else quality, noise,
                out / "selection_quality_regret.png",
                subtitle=f"headline: the {len(headline['targets'])} of {len(gt.targets())} "
                         "targets whose baseline learns" if split else None)
    print(table)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS_DIR / "transfer_matrix.jsonl"))
    parser.add_argument("--out", default=str(RESULTS_DIR),
                        help="Where the JSON, markdown, plots and score cache go.")
    parser.add_argument("--work", default=None,
                        help="The runner's work folder (default benchmarks/work/matrix).")
    parser.add_argument("--recompute", action="store_true",
                        help="Rescore every method (needs the work registries); an "
                             "interrupted rescoring resumes at the first method it had "
                             "not finished.")
    parser.add_argument("--protocol", default=None, help="Protocol key, if several.")
    parser.add_argument("--tasks", default=None,
                        help="Score only the cells among these tasks (comma-separated specs "
                             "or 'all' = the benchmark pool; default: every row).")
    parser.add_argument("--kernel-results", default=str(RESULTS_DIR / "kernel_transfer.jsonl"),
                        help="Pair scores of kernel_transfer.py (the 'kernel (eNTK)' row; "
                             "skipped when the file is missing).")
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1"])
    parser.add_argument("--approx-rank", type=int, default=64)
    parser.add_argument("--lowrank", type=int, default=32, help="Rank of the low-rank ESMs.")
    parser.add_argument("--repeats", type=int, default=3, help="Timing repeats (median).")
    parser.add_argument("--prefilter", type=int, nargs="*", default=list(DEFAULT_PREFILTERS),
                        help="A row per K: rank(prefilter=K) on the shipped registry "
                             "(default: %(default)s; none: no such rows).")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    regenerate(results=args.results, out=args.out, work=args.work, recompute=args.recompute,
               protocol_key=args.protocol, tasks=args.tasks,
               kernel_results=args.kernel_results,
               metric=args.metric, approx_rank=args.approx_rank,
               lowrank=args.lowrank, repeats=args.repeats,
               prefilters=tuple(args.prefilter), progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
