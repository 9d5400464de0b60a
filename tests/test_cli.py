import dataclasses
import json

import pandas as pd
import pytest

from stepstone.cli import main
from tests.conftest import make_texts


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tasks_json(capsys):
    code, out, _ = _run(capsys, "tasks", "--json")
    rows = json.loads(out)
    assert code == 0 and {"sms_spam", "trec6", "bbc_news"} <= {r["id"] for r in rows}


def test_registry_commands_end_to_end(capsys, tmp_path, tiny_model_dir):
    texts, labels = make_texts(60)
    pd.DataFrame({"sentence": texts, "y": labels}).to_csv(tmp_path / "toy.csv", index=False)
    reg = str(tmp_path / "reg")
    code, out, err = _run(capsys, "registry", "build", "--registry", reg, "--sources",
                          str(tmp_path / "toy.csv"), "--text-column", "sentence",
                          "--label-column", "y", "--encoder", str(tiny_model_dir),
                          "--max-examples", "30", "--ft-epochs", "1", "--esm-val-fraction", "0.2",
                          "--no-cache", "--quiet", "--json")
    assert code == 0, err
    added = json.loads(out)["added"]
    assert len(added) == 1 and added[0].startswith("toy-")
    code, out, _ = _run(capsys, "registry", "list", "--registry", reg, "--json")
    assert [e["task_id"] for e in json.loads(out)["esms"]] == ["toy"]
    code, out, _ = _run(capsys, "registry", "show", added[0], "--registry", reg, "--json")
    cfg = json.loads(out)["config"]
    assert cfg["num_examples"] == 30 and cfg["fit"]["val_fraction"] == 0.2
    assert cfg["finetune"]["epochs"] == 1
    assert _run(capsys, "registry", "verify", "--registry", reg)[0] == 0
    code, out, _ = _run(capsys, "registry", "remove", added[0], "--registry", reg)
    assert code == 0 and "removed 1" in out


def test_clear_errors_exit_2(capsys, tmp_path):
    code, _, err = _run(capsys, "registry", "list", "--registry", str(tmp_path))
    assert code == 2 and "No registry at" in err
    code, _, err = _run(capsys, "registry", "build", "--registry", str(tmp_path / "r"),
                        "--sources", "x.csv", "--encoder", str(tmp_path / "no-such-model"))
    assert code == 2 and "Cannot load encoder" in err


def test_build_reports_a_bad_source_by_name(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    code, out, _ = _run(capsys, "registry", "build", "--registry", str(tmp_path / "r"),
                        "--sources", str(tmp_path / "bad.csv"), "--quiet", "--no-cache",
                        "--encoder", str(tiny_model_dir), "--json")
    failed = json.loads(out)["failed"]
    assert code == 1
    assert "Column(s) ['text', 'label'] not found" in failed[str(tmp_path / "bad.csv")]


@pytest.mark.slow
def test_shipped_registry_lists_and_verifies(capsys):
    from stepstone.esm.catalog import builtin_ids, is_available

    code, out, _ = _run(capsys, "registry", "list", "--json")
    tasks = {e["task_id"] for e in json.loads(out)["esms"]}
    # the shipped sources are built-in tasks (the Makefile's REGISTRY_SOURCES), not
    # necessarily every task of the catalog
    assert tasks and tasks <= {t for t in builtin_ids() if is_available(t)}
    code, out, _ = _run(capsys, "registry", "verify", "--json")
    assert code == 0 and json.loads(out)["ok"]


def test_writing_commands_need_an_explicit_registry(capsys):
    for argv in (["registry", "build", "--sources", "sms_spam"], ["registry", "remove", "x"],
                 ["registry", "import-hfselect", "p"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "required: --registry" in capsys.readouterr().err


# -- options refused before any work (the checks live in rank(), which the CLI calls) --------
@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "vocab", "--layer", "1"], "method 'vocab' does not take 'layer'"),
    (["--top", "0"], "'top' must be an int >= 1 or None; got 0."),
    (["--top", "-3"], "'top' must be an int >= 1 or None; got -3."),
    (["--max-examples", "1"], "'max_examples' must be an int >= 2 or None; got 1."),
    (["--prefilter", "0"], "'prefilter' must be an int >= 1 or None; got 0."),
])
def test_rank_refuses_bad_options_before_any_work(capsys, monkeypatch, flags, message):
    import stepstone.selection.ranking as ranking

    def no_work(*args, **kwargs):
        raise AssertionError("options must be checked before the registry or data is read")

    monkeypatch.setattr(ranking, "open_registry", no_work)
    monkeypatch.setattr(ranking, "load_task", no_work)
    code, out, err = _run(capsys, "rank", "builtin:trec6", "--quiet", *flags)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_rank_refuses_an_unwritable_side_file_before_any_work(capsys, monkeypatch, tmp_path,
                                                              flag):
    import stepstone.selection.ranking as ranking

    monkeypatch.setattr(ranking, "rank", lambda *a, **k: pytest.fail("ranked anyway"))
    (tmp_path / "a-file").write_text("x")
    code, _, err = _run(capsys, "rank", "builtin:trec6", flag, str(tmp_path))
    assert code == 2 and f"{flag} must name a file; got the folder" in err
    code, _, err = _run(capsys, "rank", "builtin:trec6", flag, str(tmp_path / "a-file" / "r"))
    assert code == 2 and "is a file" in err


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_unexpected_exceptions_propagate_from_the_cli(capsys, monkeypatch, error):
    """Only the library's own errors become 'error: ...'; anything else is a bug."""
    import stepstone.selection.ranking as ranking

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(ranking, "rank", broken)
    with pytest.raises(type(error), match="a bug"):
        main(["rank", "builtin:trec6", "--quiet"])


def test_library_errors_become_one_line_messages(capsys, monkeypatch):
    import stepstone.selection.ranking as ranking
    from stepstone.esm.errors import ConfigError

    def refused(*args, **kwargs):
        raise ConfigError("'x' must be >= 1; got 0.")

    monkeypatch.setattr(ranking, "rank", refused)
    code, _, err = _run(capsys, "rank", "builtin:trec6", "--quiet")
    assert code == 2 and err == "error: 'x' must be >= 1; got 0.\n"


def test_settings_errors_are_config_errors(tiny_model_dir):
    """Every settings dataclass refuses a bad value with ConfigError (still a ValueError)."""
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.errors import ConfigError
    from stepstone.esm.model import ESMFitSettings
    from stepstone.finetune.build import BuildSettings
    from stepstone.finetune.executor import ExecutorSettings
    from stepstone.finetune.stabilize import StabilizerSettings
    from stepstone.finetune.train import FinetuneSettings
    from stepstone.finetune.transfer import LRSearchSettings, TransferSettings
    from stepstone.selection.scorers import get_scorer

    for make in (lambda: BuildSettings(max_examples=1), lambda: ESMFitSettings(epochs=0),
                 lambda: ExecutorSettings(executor="slurm"), lambda: FinetuneSettings(lr=0),
                 lambda: StabilizerSettings(members=0), lambda: TransferSettings(seeds=0),
                 lambda: LRSearchSettings(trials=0), lambda: get_scorer("knn", k=0),
                 lambda: get_scorer("esm-logme", approx_rank=0),
                 lambda: load_encoder(str(tiny_model_dir), pooling="max")):
        with pytest.raises(ConfigError, match="; got "):
            make()


def test_benchmark_uses_the_cli_option_builder():
    """One dataclass->argparse builder (stepstone.cli.add_config_args) for every caller."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = []
    for folder in ("benchmarks", "esm", "selection", "finetune", "stepstone"):
        for here, dirs, files in os.walk(root / folder):
            # benchmarks/work and .envs hold run outputs and other packages, not ours
            dirs[:] = sorted(d for d in dirs if d not in ("work", "__pycache__")
                             and not d.startswith("."))
            sources += [Path(here) / f for f in sorted(files) if f.endswith(".py")]
    assert len(sources) > 50
    builders = [p.relative_to(root).as_posix() for p in sources
                if "dataclasses.fields(" in (text := p.read_text()) and "add_argument(" in text]
    assert builders == ["stepstone/cli.py"]


def test_benchmark_protocol_options_build_the_same_protocol(monkeypatch):
    from tests.test_benchmarks_smoke import tm

    seen = {}
    monkeypatch.setattr(tm, "run", lambda **kw: seen.update(kw) or {})
    tm.main(["run", "--lr", "1e-5", "--exit-layer", "0", "--source-max-examples", "500"])
    assert seen["protocol"] == tm.Protocol(lr=1e-5, exit_layer=0, source_max_examples=500)
    tm.main(["run"])
    assert seen["protocol"] == tm.Protocol()
    if "v2" in getattr(tm, "PROTOCOLS", {}):  # presets: the options override their fields
        tm.main(["run", "--protocol", "v2", "--epochs", "7"])
        assert seen["protocol"] == dataclasses.replace(tm.PROTOCOLS["v2"], epochs=7)
