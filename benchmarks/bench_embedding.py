"""Embedding throughput of the default encoder: dynamic padding vs padding to 128.

Both modes embed the same texts side by side in one run, alternating, several
repeats; the medians and their ratio are printed and written to
benchmarks/results/embedding.json. No cache is used (it would time lookups).
Early exit (``--exit-layers 3``) adds the dynamically padded throughput of the
encoder stopped after that many layers (Kang et al. 2021), in the same rotation.

    python benchmarks/bench_embedding.py [--n 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from stepstone.esm.catalog import load_builtin
from stepstone.esm.encoder import load_encoder

TASKS = ("sms_spam", "tweet_sentiment", "trec6", "movie_polarity", "bbc_news")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="Texts per run.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--exit-layers", type=int, nargs="*", default=[2, 4],
                        help="Also time early exit after these layers.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "embedding.json"))
    args = parser.parse_args()

    per_task = args.n // len(TASKS)
    texts = [t for task in TASKS for t in load_builtin(task).train.texts[:per_task]]
    encoder = load_encoder()
    encoder.embed(texts[:64], progress=False)  # warm-up
    early = {f"dynamic-layer{k}": encoder.with_layer(k) for k in args.exit_layers}
    times: dict[str, list[float]] = {"dynamic": [], "pad128": [], **{m: [] for m in early}}
    for _ in range(args.repeats):
        for mode in times:
            start = time.perf_counter()
            early.get(mode, encoder).embed(texts, batch_size=args.batch_size,
                                           pad_to_max=(mode == "pad128"), progress=False)
            times[mode].append(time.perf_counter() - start)
    lengths = [len(x) for x in encoder.tokenize(texts)["input_ids"]]
    result = {
        "texts": len(texts), "tasks": TASKS, "batch_size": args.batch_size,
        "max_length": encoder.max_length, "mean_tokens": float(np.mean(lengths)),
        "median_seconds": {m: statistics.median(v) for m, v in times.items()},
        "texts_per_second": {m: len(texts) / statistics.median(v) for m, v in times.items()},
        "speedup_dynamic_over_pad128": statistics.median(times["pad128"])
        / statistics.median(times["dynamic"]),
        "all_seconds": times,
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(texts)} texts (mean {result['mean_tokens']:.1f} tokens, max_length "
          f"{encoder.max_length}), medians over {args.repeats} repeats:")
    for mode in times:
        print(f"  {mode:<8} {result['texts_per_second'][mode]:8.1f} texts/s")
    print(f"  dynamic padding is {result['speedup_dynamic_over_pad128']:.2f}x faster")


if __name__ == "__main__":
    main()
