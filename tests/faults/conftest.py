"""A small registry made without fine-tuning: three ESMs fitted on random pairs for the
tiny encoder, so the fault tests stay fast."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest

from stepstone.esm.model import ESMConfig, fit_esm
from stepstone.esm.registry import Registry, esm_id_for

TASKS = ("alpha", "beta", "gamma")


def make_esm(task_id, identity, seed=0, **config):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, identity.dim)).astype(np.float32)
    Y = X @ rng.normal(scale=0.3, size=(identity.dim, identity.dim)).astype(np.float32) + X
    cfg = ESMConfig(encoder=dataclasses.asdict(identity), task_id=task_id,
                    classes=["neg", "pos"], **config)
    return fit_esm(X, Y, config=cfg)[0]


def key_of(task_id: str) -> str:
    """A stand-in settings key."""
    return hashlib.sha256(task_id.encode()).hexdigest()


@pytest.fixture()
def registry_dir(tmp_path, tiny_encoder):
    """``tmp_path/box/reg`` holding three ESMs (ids ``<task>-<key[:8]>``)."""
    folder = tmp_path / "box" / "reg"
    with Registry(folder, "w", create=True) as reg:
        for i, task in enumerate(TASKS):
            vec = np.random.default_rng(i).normal(size=tiny_encoder.dim)
            reg.add(make_esm(task, tiny_encoder.identity, seed=i),
                    esm_id=esm_id_for(task, key_of(task)), settings_key=key_of(task),
                    task_vector=vec / np.linalg.norm(vec),
                    profile={"num_train": 60, "token_counts": {"good": 1}})
    return folder


def snapshot(root) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its size, mtime and mode: equal snapshots mean
    nothing was created, changed or deleted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out
