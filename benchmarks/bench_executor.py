"""Registry build wall time: the local executor vs Ray with 2 workers, tiny model.

Six synthetic sources (the test suite's tiny random 2-layer BERT and word-pool
texts) are built into a fresh registry by each executor, alternating, several
repeats; medians and their ratio are printed and written to
benchmarks/results/executor.json. Ray runs on a local cluster started once before
the repeats (its start-up and the first build, which also starts the worker
processes, are reported separately); the median is over all repeats.

    python benchmarks/bench_executor.py [--sources 6] [--repeats 3] [--examples 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepstone.esm.data import make_task  # noqa: E402
from stepstone.esm.encoder import load_encoder  # noqa: E402
from stepstone.esm.registry import Registry  # noqa: E402
from stepstone.finetune.build import BuildSettings, build_registry  # noqa: E402
from stepstone.finetune.executor import ExecutorSettings  # noqa: E402
from stepstone.finetune.train import FinetuneSettings  # noqa: E402
from tests.conftest import build_tiny_model, make_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=200, help="Training examples/source.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "executor.json"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray starts its workers at nice 15; on a shared machine that alone would slow
    # them against the local run (nice 0). Same priority for both, so the ratio is fair.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    encoder = load_encoder(str(build_tiny_model(work / "tiny-bert")), max_length=32)
    tasks = [make_task(f"src{i}", *make_texts(args.examples + 100, seed=i), seed=0)
             for i in range(args.sources)]
    settings = BuildSettings(max_examples=args.examples, max_eval=100,
                             finetune=FinetuneSettings(epochs=args.epochs, batch_size=16))
    # local: torch on all cores (the default); local-1-thread: what each Ray worker
    # gets (torch threads = cpus_per_job = 1), to separate parallel jobs from threading.
    executors = {"local": ExecutorSettings(), "local-1-thread": ExecutorSettings(),
                 f"ray-{args.workers}-workers": ExecutorSettings(executor="ray",
                                                                 num_workers=args.workers)}
    threads = torch.get_num_threads()
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    ray_init = time.perf_counter() - start
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in executors}
    for r in range(args.repeats):
        for name, executor in executors.items():
            folder = work / f"{name}-{r}"
            torch.set_num_threads(1 if name == "local-1-thread" else threads)
            t0 = time.perf_counter()
            report = build_registry(folder, tasks, encoder=encoder, settings=settings,
                                    progress=False, executor=executor)
            times[name].append(time.perf_counter() - t0)
            torch.set_num_threads(threads)
            if report.failed or len(report.added) != args.sources:
                raise SystemExit(f"{name} build failed: {report}")
            assert Registry(folder).verify().ok
            print(f"repeat {r + 1}: {name:>16} {times[name][-1]:7.2f} s", flush=True)
    load_after = os.getloadavg()
    ray.shutdown()
    local, local1, remote = (statistics.median(v) for v in times.values())
    result = {
        "sources": args.sources, "examples_per_source": args.examples, "epochs": args.epochs,
        "model": "tiny random BERT (2 layers, hidden 32, tests/conftest.py)",
        "workers": args.workers, "repeats": args.repeats,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "median_seconds_per_source": {k: statistics.median(v) / args.sources
                                      for k, v in times.items()},
        "speedup_ray_over_local": local / remote,
        "speedup_ray_over_local_1_thread": local1 / remote,
        "ray_init_seconds": ray_init,
        "ray_first_build_seconds": times[f"ray-{args.workers}-workers"][0],
        "all_seconds": times,
        "ray_worker_niceness": os.environ["RAY_worker_niceness"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads_local": threads, "ray": ray.__version__,
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load_after},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'executor':>18} {'median s':>9} {'s/source':>9}")
    for k, v in times.items():
        print(f"{k:>18} {statistics.median(v):9.2f} {statistics.median(v) / args.sources:9.2f}")
    print(f"Ray / local speed-up: {local / remote:.2f}x, Ray / local-1-thread "
          f"{local1 / remote:.2f}x (ray.init {ray_init:.1f} s, first Ray "
          f"build {result['ray_first_build_seconds']:.1f} s); load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
