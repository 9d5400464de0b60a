"""Executors: local vs a real local Ray cluster (no mocks), retries, driver death.

The Ray tests share the session's cluster (``ray_cluster`` in tests/conftest.py, which
marks them ``ray``) and skip only when Ray is not installed (``pip install
'stepstone[ray]'``; CI has it).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from stepstone.esm.registry import Registry
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.executor import (
    ExecutorSettings,
    ExecutorUnavailableError,
    Job,
    LocalExecutor,
    RayExecutor,
    import_ray,
)
from tests.finetune.test_build import FAST, _tasks

ROOT = Path(__file__).resolve().parents[2]


def _ray(**kw) -> ExecutorSettings:
    return ExecutorSettings(executor="ray", num_workers=2, **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deterministic_config(reg: Registry, esm_id: str) -> dict:
    cfg = reg.config(esm_id).to_dict()
    cfg.pop("created")
    cfg["finetune"].pop("seconds")  # wall time of the fine-tune
    return cfg


# -- settings and the generic map ------------------------------------------------------
def test_settings_validate_with_expected_and_got():
    with pytest.raises(ValueError, match=r"'executor' must be one of \['local', 'ray'\]; "
                                         r"got 'dask'"):
        ExecutorSettings(executor="dask")
    with pytest.raises(ValueError, match="only apply to executor='ray'"):
        ExecutorSettings(num_workers=2)
    with pytest.raises(ValueError, match="'max_retries' must be >= 0; got -1"):
        ExecutorSettings(executor="ray", max_retries=-1)


def test_cli_options_come_from_the_settings():
    from stepstone.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["registry", "build", "--registry", "r", "--sources", "a", "--executor", "ray",
         "--ray-address", "auto", "--num-workers", "3", "--gpus-per-job", "0.5",
         "--max-retries", "1"])
    got = config_from_args(ExecutorSettings, args)
    assert got == ExecutorSettings(executor="ray", ray_address="auto", num_workers=3,
                                   gpus_per_job=0.5, max_retries=1)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ExecutorUnavailableError, match=r"pip install 'stepstone\[ray\]'"):
        import_ray()
    with pytest.raises(ExecutorUnavailableError):
        with RayExecutor(ExecutorSettings(executor="ray")):
            pass


def _map_jobs(ex, catch):
    jobs = [Job("good", {"s": "[1, 2]"}), Job("bad", {"s": "[1,"})]
    return {r.id: r for r in ex.map(json.loads, jobs, catch=catch, progress=False)}


def test_local_map_reports_caught_errors_and_raises_others():
    with LocalExecutor() as ex:
        out = _map_jobs(ex, (ValueError,))
        assert out["good"].value == [1, 2] and out["good"].ok
        assert out["bad"].error.startswith("JSONDecodeError: ") and not out["bad"].crashed
        with pytest.raises(ValueError):
            _map_jobs(ex, ())
        with pytest.raises(ValueError, match="unique"):
            list(ex.map(json.loads, [Job("a", {"s": "1"}), Job("a", {"s": "2"})]))


def test_ray_map_reports_caught_errors_and_raises_others(ray_cluster):
    with RayExecutor(_ray()) as ex:
        out = _map_jobs(ex, (ValueError,))
        assert out["good"].value == [1, 2] and out["good"].seconds >= 0
        assert out["bad"].error.startswith("JSONDecodeError: ") and not out["bad"].crashed
        with pytest.raises(ValueError):
            _map_jobs(ex, ())
    with pytest.raises(ValueError, match="gpus_per_job=1.0 but the Ray cluster has 0 GPU"):
        RayExecutor(_ray(gpus_per_job=1)).__enter__()


# -- registry builds on Ray ------------------------------------------------------------
def test_ray_build_makes_the_same_registry_as_local(tmp_path, tiny_encoder, ray_cluster):
    settings = BuildSettings(**FAST, keep_models=True)
    # Ray runs each job with torch threads = cpus_per_job (1); bitwise equality needs
    # the local build to sum floats in the same order, i.e. with 1 thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = build_registry(tmp_path / "local", _tasks(3), encoder=tiny_encoder,
                               settings=settings, progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = build_registry(tmp_path / "ray", _tasks(3), encoder=tiny_encoder,
                            settings=settings, progress=False, executor=_ray())
    assert not local.failed and not remote.failed, (local.failed, remote.failed)
    assert sorted(remote.added) == sorted(local.added) and len(local.added) == 3
    a, b = Registry(tmp_path / "local"), Registry(tmp_path / "ray")
    assert b.verify().ok, b.verify()
    for ea, eb in zip(a.entries(), b.entries(), strict=True):
        assert (ea.id, ea.settings_key, ea.fingerprint) == (eb.id, eb.settings_key,
                                                            eb.fingerprint)
        assert ea.has_model and eb.has_model
        # The deterministic parts are byte-identical: ESM weights, the kept source
        # model, the profile and task vector; configs differ only in wall-clock fields.
        for rel in ("model.safetensors", "profile.json"):
            assert _sha(a.esm_dir(ea.id) / rel) == _sha(b.esm_dir(eb.id) / rel), rel
        for rel in ("head.safetensors", "encoder/model.safetensors"):
            assert _sha(a.model_dir(ea.id) / rel) == _sha(b.model_dir(eb.id) / rel), rel
        assert _deterministic_config(a, ea.id) == _deterministic_config(b, eb.id)
        np.testing.assert_array_equal(ea.task_vector, eb.task_vector)
    again = build_registry(tmp_path / "ray", _tasks(3), encoder=tiny_encoder,
                           settings=settings, progress=False, executor=_ray())
    assert again.added == [] and sorted(again.skipped) == ["toy0", "toy1", "toy2"]


def test_dead_workers_are_retried_then_reported(tmp_path, tiny_encoder, ray_cluster):
    _, hook = ray_cluster
    for old in hook.glob("*.attempts"):  # earlier tests' jobs share the ids
        old.unlink()
    (hook / "toy1.crash-once").write_text("0.05")  # dies 50 ms into its first attempt
    (hook / "toy0.crash-always").write_text("0.05")  # dies on every attempt
    try:
        report = build_registry(tmp_path, _tasks(3), encoder=tiny_encoder,
                                settings=BuildSettings(**FAST), progress=False,
                                executor=_ray(max_retries=1))
    finally:
        (hook / "toy0.crash-always").unlink()
    attempts = {t: (hook / f"{t}.attempts").read_text().split() for t in ("toy0", "toy1")}
    assert len(attempts["toy1"]) == 2 and len(set(attempts["toy1"])) == 2  # a new process
    assert len(attempts["toy0"]) == 2  # 1 + max_retries, then given up
    assert list(report.failed) == ["toy0"]
    assert report.failed["toy0"].startswith("worker died on all 2 attempt(s)")
    reg = Registry(tmp_path, "w")  # opening for writing recovers
    assert reg.verify().ok and [e.task_id for e in reg.entries()] == ["toy1", "toy2"]
    rerun = build_registry(reg, _tasks(3), encoder=tiny_encoder, settings=BuildSettings(**FAST),
                           progress=False, executor=_ray())
    assert [reg.get(i).task_id for i in rerun.added] == ["toy0"] and not rerun.failed
    assert sorted(rerun.skipped) == ["toy1", "toy2"] and reg.verify().ok


KILL_DRIVER = """
import os, signal, sys
import stepstone.finetune.build as B
from stepstone.esm.encoder import load_encoder
from stepstone.finetune.executor import ExecutorSettings
from tests.finetune.test_build import FAST, _tasks
real = B.add_source
def add_then_die(*a, **k):
    out = real(*a, **k)
    if out:  # the first ESM is in the registry; other jobs are still on the workers
        os.kill(os.getpid(), signal.SIGKILL)
    return out
B.add_source = add_then_die
B.build_registry(sys.argv[2], _tasks(4), encoder=load_encoder(sys.argv[1], max_length=32),
                 settings=B.BuildSettings(**FAST), progress=False,
                 executor=ExecutorSettings(executor="ray", ray_address=sys.argv[3],
                                           num_workers=2))
"""


def test_killed_driver_resumes_with_nothing_lost(tmp_path, tiny_model_dir, tiny_encoder,
                                                 ray_cluster):
    address, _ = ray_cluster
    script = tmp_path / "kill_driver.py"
    script.write_text(textwrap.dedent(KILL_DRIVER))
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "r"), address],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    reg = Registry(tmp_path / "r", "w")  # opening for writing recovers
    assert reg.verify().ok and len(reg) == 1
    first = reg.entries()[0].task_id
    report = build_registry(reg, _tasks(4), encoder=tiny_encoder, settings=BuildSettings(**FAST),
                            progress=False, executor=_ray())
    assert report.skipped == [first] and len(report.added) == 3 and not report.failed
    assert reg.verify().ok
    assert sorted(e.task_id for e in reg.entries()) == ["toy0", "toy1", "toy2", "toy3"]
