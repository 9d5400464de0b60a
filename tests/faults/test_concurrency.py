"""A reader racing a build, and two builds at once (issue 19)."""

from __future__ import annotations

import threading

from stepstone.esm import registry as R
from stepstone.esm.data import make_task
from stepstone.esm.registry import Registry
from stepstone.finetune import build as B
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.train import FinetuneSettings
from tests.conftest import make_texts

FAST = dict(max_examples=30, max_eval=10, finetune=FinetuneSettings(epochs=1, batch_size=8))


def _task(name="toy", seed=0):
    texts, labels = make_texts(40, seed=seed)
    return make_task(name, texts, labels)


def test_reader_at_the_worst_moment_does_not_break_the_build(tmp_path, tiny_encoder,
                                                             monkeypatch):
    """The hook runs after the ESM is staged and fsynced, before it is renamed into place:
    a reader opening the registry then must neither disturb the build nor see a problem."""
    folder = tmp_path / "reg"
    seen = []
    real = R.fsync_tree

    def staged_then_read(path):
        real(path)
        reader = Registry(folder)
        seen.append((len(reader), reader.verify()))
        reader.close()

    monkeypatch.setattr(R, "fsync_tree", staged_then_read)
    report = build_registry(folder, [_task()], encoder=tiny_encoder,
                            settings=BuildSettings(**FAST), progress=False)
    assert len(report.added) == 1 and not report.failed
    ((count, verified),) = seen
    assert count == 0 and verified.ok, str(verified)
    assert "right now" in str(verified)  # the addition in flight is a note, not a problem
    final = Registry(folder).verify()
    assert final.ok and final.checked == 1, str(final)


def test_two_builds_serialise_and_fine_tune_once(tmp_path, tiny_model_dir, monkeypatch):
    from stepstone.esm.encoder import load_encoder

    folder = tmp_path / "reg"
    tuned = []
    real = B.finetune

    def counting(model, *args, **kwargs):
        tuned.append(kwargs.get("desc"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(B, "finetune", counting)
    start = threading.Barrier(2)
    reports, errors = [], []

    def one_build():
        encoder = load_encoder(str(tiny_model_dir), max_length=32)
        start.wait()
        try:
            reports.append(build_registry(folder, [_task()], encoder=encoder,
                                          settings=BuildSettings(**FAST), progress=False))
        except BaseException as err:  # surfaced below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=one_build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(tuned) == 1, f"the source was fine-tuned {len(tuned)} times"
    assert sorted(len(r.added) for r in reports) == [0, 1]
    assert sorted(r.skipped for r in reports) == [[], ["toy"]]
    reg = Registry(folder)
    assert len(reg) == 1 and reg.verify().ok
