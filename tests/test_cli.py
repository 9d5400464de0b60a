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
                          "--max-examples", "30", "--ft-epochs", "1", "--esm-epochs", "2",
                          "--no-cache", "--quiet", "--json")
    assert code == 0, err
    added = json.loads(out)["added"]
    assert len(added) == 1 and added[0].startswith("toy-")
    code, out, _ = _run(capsys, "registry", "list", "--registry", reg, "--json")
    assert [e["task_id"] for e in json.loads(out)["esms"]] == ["toy"]
    code, out, _ = _run(capsys, "registry", "show", added[0], "--registry", reg, "--json")
    cfg = json.loads(out)["config"]
    assert cfg["num_examples"] == 30 and cfg["fit"]["epochs"] == 2
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
    assert tasks == {t for t in builtin_ids() if is_available(t)}
    code, out, _ = _run(capsys, "registry", "verify", "--json")
    assert code == 0 and json.loads(out)["ok"]


def test_writing_commands_need_an_explicit_registry(capsys):
    for argv in (["registry", "build", "--sources", "sms_spam"], ["registry", "remove", "x"],
                 ["registry", "import-hfselect", "p"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "required: --registry" in capsys.readouterr().err
