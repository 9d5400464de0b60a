"""Output a person can act on (issue 18, part B): the rank footer, ties, `--method logme`,
methods that need kept source models, the plot, `registry show`/`build` output,
`--version`, and errors that name the option that fixes them. Tiny model throughout."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

import numpy as np
import pytest

from stepstone.cli import main
from tests.conftest import write_task_csv


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


_csv = write_task_csv


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Two sources built through the CLI (no kept models; the build's printed output
    kept), a third in a second registry with its model kept, and a target file."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("cli-reports")
    fast = ["--encoder", str(tiny_model_dir), "--max-examples", "40", "--max-eval", "16",
            "--ft-epochs", "1", "--no-cache", "--quiet"]
    sources = [_csv(root / f"src{i}.csv", 60, seed=10 + i) for i in range(3)]
    build_out = io.StringIO()
    with contextlib.redirect_stdout(build_out):
        assert main(["registry", "build", "--registry", str(root / "reg"), "--sources",
                     *sources[:2], *fast]) == 0
        assert main(["registry", "build", "--registry", str(root / "kept"), "--sources",
                     sources[2], "--keep-models", *fast]) == 0
    return {"root": root, "reg": str(root / "reg"), "kept": str(root / "kept"),
            "target": _csv(root / "target.csv", 50, seed=99), "build_out": build_out.getvalue()}


def _rank(capsys, world, *flags, registry="reg"):
    return _run(capsys, "rank", world["target"], "--registry", world[registry], "--quiet",
                "--no-cache", *flags)


# -- rank: the footer explains the score and the reference --------------------------------
def test_rank_footer_explains_score_and_reference_and_says_who_beats_it(capsys, world):
    code, out, err = _rank(capsys, world, "--json")
    assert code == 0, err
    data = json.loads(out)
    ref, rows = data["reference_base_logme"], data["ranking"]
    above = [r for r in rows if r["score"] > ref]
    notes = data["score_notes"]
    assert notes[0].startswith("score: LogME evidence") and "higher = ranked first" in notes[0]
    assert notes[1].startswith("(no intermediate step): LogME of the target's own base")
    if above:
        assert f"{len(above)} of {len(rows)} shown sources score above" in notes[2]
        assert above[0]["task_id"] in notes[2]
    else:
        assert notes[2].startswith("No source scores above the no-intermediate step")
    code, out, _ = _rank(capsys, world)
    assert code == 0 and all(line in out for line in notes)  # the same lines, under the table
    assert out.index("(no intermediate step)  ") < out.index(notes[0])


def test_ranking_says_plainly_when_no_source_beats_the_reference():
    from stepstone.selection.ranking import RankedSource, Ranking

    rows = [RankedSource(1, "a-1", "a", -0.70, 40, "classification"),
            RankedSource(2, "b-1", "b", -0.71, 40, "classification")]
    text = str(Ranking("t", "esm-logme", rows, reference=-0.65))
    assert ("No source scores above the no-intermediate step: by this score, no "
            "intermediate step is expected to help; fine-tune on the target directly.") in text
    text = str(Ranking("t", "esm-logme", rows, reference=-0.705))
    assert "1 of 2 shown sources score above the no-intermediate step; the best, a, by " \
           "+0.005" in text


def test_rank_logme_shows_the_one_reference_not_a_ranking(capsys, world):
    code, out, _ = _rank(capsys, world, "--method", "logme", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["ranking"]) == 2
    assert all(r["tied"] for r in data["ranking"])  # one score for every source
    code, out, _ = _rank(capsys, world, "--method", "logme")
    assert code == 0
    assert (f"LogME of the target's base embeddings (no intermediate step): "
            f"{data['reference_base_logme']:.4f}") in out
    assert "it gives all 2 the score above, so it ranks nothing" in out
    assert not re.search(r"^\s+1=?\s+src", out, re.M)  # no "1 .. 2" table of equal rows


def test_ties_are_marked_in_rows_table_and_plot(tmp_path, monkeypatch):
    from stepstone.selection.ranking import RankedSource, Ranking, _tied

    assert _tied([1.0, 1.0 + 1e-12, 0.5, 0.2, 0.2]) == [True, True, False, True, True]
    rows = [RankedSource(1, "a-1", "a", -0.5, 40, "classification", tied=True),
            RankedSource(2, "b-1", "b", -0.5, 40, "classification", tied=True),
            RankedSource(3, "c-1", "c", -0.50004, 40, "classification")]
    ranking = Ranking("t", "esm-logme", rows, reference=-0.6)
    text = str(ranking)
    assert re.search(r"^\s+1=\s+a\s", text, re.M) and re.search(r"^\s+2=\s+b\s", text, re.M)
    assert re.search(r"^\s+3\s+c\s", text, re.M)
    assert "'=': tied with a neighbour" in text
    # b and c differ in the 5th decimal: printed with enough digits to tell them apart
    assert "-0.50000" in text and "-0.50004" in text
    figures = _spy_figures(monkeypatch)
    ranking.plot(tmp_path / "r.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels()]
    assert "a (=)" in labels and "c" in labels


def test_rank_ties_from_rank_itself_are_marked(world):
    from stepstone.selection.ranking import rank

    ranking = rank(world["target"], world["reg"], "esm-logme", progress=False, cache=False)
    scores = [r.score for r in ranking.rows]
    assert [r.tied for r in ranking.rows] == [
        bool(np.isclose(scores[0], scores[1], rtol=1e-9, atol=0))] * 2
    assert list(ranking.to_pandas()["tied"]) == [r.tied for r in ranking.rows]  # in --csv


# -- methods that need kept models, and the early-exit layer -----------------------------
@pytest.mark.parametrize("method", ["source-logme", "kernel"])
def test_kept_model_methods_fail_without_kept_models(capsys, world, method):
    code, out, err = _rank(capsys, world, "--method", method)
    assert code == 2 and out == ""
    assert f"Method {method!r} scores each source with its kept fine-tuned model" in err
    assert "kept none for its 2 candidate(s)" in err and "--keep-models" in err


@pytest.mark.parametrize(("method", "module"), [("source-logme", "stepstone.esm.encoder"),
                                                ("kernel", "stepstone.selection.entk")])
def test_kept_model_progress_advances_within_a_source(world, monkeypatch, method, module):
    """Not just the per-source bar (0/1 -> 1/1): an enabled bar counts the target's texts
    (source-logme) or kernel examples while the one kept source model is scored."""
    import importlib

    from tqdm.auto import tqdm

    from stepstone.selection.ranking import rank

    finished = []

    class Recording(tqdm):  # the real bar, with its final count recorded
        def close(self):
            finished.append((self.desc, self.unit, self.n, self.total, self.disable))
            super().close()

    monkeypatch.setattr(importlib.import_module(module), "tqdm", Recording)
    ranking = rank(world["target"], world["kept"], method, progress=True, cache=False)
    assert len(ranking.rows) == 1, ranking.errors
    shown = [b for b in finished if not b[4] and b[3] and b[3] > 1 and b[2] == b[3]]
    if method == "source-logme":  # the target's own embedding, then the source model's
        assert [b[:2] for b in shown] == [("embedding", "text")] * 2
    else:
        assert shown and all(b[0].startswith("eNTK") and b[1] == "example" for b in shown)


def test_layer_error_suggests_exit_layers(capsys, world):
    code, _, err = _rank(capsys, world, "--layer", "1")
    assert code == 2
    assert "No ESM here was fitted on layer 1's embeddings" in err
    assert "--exit-layers 1" in err


# -- the plot -----------------------------------------------------------------------------
def _spy_figures(monkeypatch) -> list:
    """Record every figure saved (the real savefig still runs)."""
    from matplotlib.figure import Figure

    saved, real = [], Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_rank_plot_draws_differences_from_the_reference(capsys, world, tmp_path, monkeypatch):
    figures = _spy_figures(monkeypatch)
    code, _, _ = _rank(capsys, world, "--top", "5", "--plot", str(tmp_path / "r.png"))
    code, out, _ = _rank(capsys, world, "--top", "5", "--json")
    data = json.loads(out)
    ax = figures[0].axes[0]
    widths = sorted(p.get_width() for p in ax.patches)
    want = sorted(r["score"] - data["reference_base_logme"] for r in data["ranking"])
    np.testing.assert_allclose(widths, want, rtol=1e-9)
    assert all(p.get_x() == 0 for p in ax.patches)  # every bar starts at the reference
    zero = [ln for ln in ax.lines if list(ln.get_xdata()) == [0, 0]]
    assert zero and "no intermediate step" in zero[0].get_label()
    assert ax.get_legend() is None and figures[0].legends  # below the axes, over no bar
    assert (tmp_path / "r.png").stat().st_size > 0


# -- registry show / build, --version, transfer --out ------------------------------------
def test_registry_build_prints_each_new_id_and_its_source_accuracy(capsys, world):
    from stepstone.esm.registry import open_registry

    reg = open_registry(world["reg"])
    for entry in reg.entries():
        acc = reg.config(entry.id).metrics["source_test_accuracy"]
        assert (f"new ESM {entry.id} (task {entry.task_id}): source model on its test split: "
                f"accuracy {acc:.3f}") in world["build_out"]


def test_registry_show_takes_a_task_id_and_suggests_ids(capsys, world):
    code, out, _ = _run(capsys, "registry", "list", "--registry", world["reg"], "--json")
    esm_id = next(e["id"] for e in json.loads(out)["esms"] if e["task_id"] == "src0")
    code, out, _ = _run(capsys, "registry", "show", "src0", "--registry", world["reg"],
                        "--json")
    assert code == 0 and json.loads(out)["entry"]["id"] == esm_id
    code, _, err = _run(capsys, "registry", "show", "srcO", "--registry", world["reg"])
    assert code == 2 and "No ESM or task 'srcO'" in err
    assert "src0" in err.split("did you mean")[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"stepstone {version('stepstone')}"


def test_transfer_checks_out_before_ranking(capsys, world, tmp_path):
    (tmp_path / "taken").write_text("x")
    # the registry does not exist either: the --out error must come first
    code, out, err = _run(capsys, "transfer", world["target"], "--registry",
                          str(tmp_path / "no-registry"), "--out", str(tmp_path / "taken"),
                          "--quiet")
    assert code == 2 and out == ""
    assert err == f"error: --out must be a folder; {str(tmp_path / 'taken')!r} is a file.\n"
    code, _, err = _run(capsys, "transfer", world["target"], "--registry",
                        str(tmp_path / "no-registry"), "--out",
                        str(tmp_path / "taken" / "sub"), "--quiet")
    assert code == 2 and "cannot be created" in err
