"""Does hf-dataset-selector load what ``stepstone registry export-hfselect`` writes, and
map embeddings as stepstone does?

Exports every ESM of a registry (default: the shipped one) to
``benchmarks/work/hfselect_export/<id>``, loads each folder with the peer's own
``ESM.from_pretrained`` and ``ESMConfig.from_pretrained`` (what its ``fetch_esms`` and
``fetch_esm_configs`` call per Hub repo), checks the config is valid for it, and
compares ``esm(x)`` with stepstone's ``EmbeddingSpaceMap.transform`` on real embeddings
of the registry's encoder and on N(0, 1) vectors. Passes when every ESM agrees to 1e-6.
Needs the peer: ``make bench-setup``, or ``pip install --no-deps --target
benchmarks/.envs/hfselect hf-dataset-selector==0.2.1 numba llvmlite`` and
``PYTHONPATH=benchmarks/.envs/hfselect``. Writes ``results/hfselect_export.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from stepstone.esm.catalog import load_builtin
from stepstone.esm.encoder import load_encoder
from stepstone.esm.hfselect_export import export_hfselect
from stepstone.esm.registry import open_registry

HERE = Path(__file__).resolve().parent
OUT = HERE / "work" / "hfselect_export"
RESULTS = HERE / "results" / "hfselect_export.json"
TOLERANCE = 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=None, help="Registry (default: shipped).")
    args = parser.parse_args()
    import hfselect
    from hfselect.esm import ESM
    from hfselect.esmconfig import ESMConfig

    reg = open_registry(args.registry)
    entries = reg.entries()
    encoder = load_encoder(entries[0].base_model, pooling=entries[0].pooling,
                           max_length=entries[0].max_length)
    texts = load_builtin("movie_polarity").train.take(range(64)).inputs()
    real = encoder.embed(texts, progress=False)
    noise = np.random.default_rng(0).normal(size=(64, encoder.dim)).astype(np.float32)
    rows = []
    for e in entries:
        folder = export_hfselect(reg, e.id, OUT / e.id)
        peer = ESM.from_pretrained(str(folder))
        config = ESMConfig.from_pretrained(str(folder))
        ours = reg.load_esm(e.id)
        diffs = []
        for X in (real, noise):
            with torch.no_grad():
                theirs = peer(torch.from_numpy(X)).numpy()
            diffs.append(float(np.abs(theirs - ours.transform(X)).max()))
        rows.append({"esm_id": e.id, "base_model_name": config.base_model_name,
                     "valid_config": bool(config.is_valid), "legacy": peer.is_legacy_model,
                     "max_abs_diff_real": diffs[0], "max_abs_diff_noise": diffs[1]})
        print(f"{e.id:<40} valid={rows[-1]['valid_config']!s:<5} "
              f"max|diff| real {diffs[0]:.1e}, N(0,1) {diffs[1]:.1e}")
    ok = all(r["valid_config"] and max(r["max_abs_diff_real"], r["max_abs_diff_noise"])
             <= TOLERANCE for r in rows)
    RESULTS.write_text(json.dumps({"hfselect": hfselect.__version__, "registry": str(reg.path),
                                   "tolerance": TOLERANCE, "ok": ok, "esms": rows}, indent=2))
    print(f"{'OK' if ok else 'FAILED'}: {len(rows)} ESMs exported and loaded by hfselect "
          f"{hfselect.__version__}; wrote {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
