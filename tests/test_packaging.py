"""The layers install under the ``stepstone`` namespace, never as bare top-level names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def _probe(code: str, cwd) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_bare_layer_names_are_not_installed(tmp_path):
    # run outside the repository, where only what is installed is importable; a bare
    # name may belong to another project (the protein `esm`), never to this one
    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util as u; "
            "print([str(s.origin) for s in map(u.find_spec, ('esm', 'selection', 'finetune')) "
            "if s])")
    found = [Path(o).resolve() for o in ast.literal_eval(_probe(code, tmp_path))]
    assert not [o for o in found if o.is_relative_to(root)]
    code = "import stepstone.esm.registry as r, stepstone.finetune as f; print(f.__name__)"
    assert _probe(code, tmp_path) == "stepstone.finetune"


def test_importing_a_layer_does_not_load_the_layers_above(tmp_path):
    code = ("import sys, stepstone.esm.registry; "
            "print(sorted(m for m in sys.modules if m.startswith(('stepstone.selection', "
            "'stepstone.finetune'))))")
    assert _probe(code, tmp_path) == "[]"


def test_public_names_resolve(tmp_path):
    import stepstone

    for name in stepstone.__all__:
        assert getattr(stepstone, name) is not None, name
