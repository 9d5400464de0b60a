"""eNTK kernels, solvers and uses (Malladi et al. 2023), on tiny random models."""

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from stepstone.esm.data import make_task
from stepstone.esm.encoder import load_encoder
from stepstone.esm.taskmodel import TaskModel
from stepstone.finetune.kernel import kernel_vs_finetune, source_encoder
from stepstone.selection.entk import KernelError, compute_kernel, select_parameters
from stepstone.selection.entk_formulations import (
    ClassifierFormulation,
    PromptFormulation,
    TensorFormulation,
)
from stepstone.selection.entk_solvers import (
    KernelLogistic,
    KernelRegression,
    KernelSettings,
    KernelSVM,
    few_shot,
    one_hot,
)
from stepstone.selection.scorers import (
    METHODS,
    SCORERS,
    KernelScorer,
    Scorer,
    available_methods,
    get_scorer,
    register_scorer,
)
from tests.conftest import make_texts

EPS = 1e-6


@pytest.fixture()
def task_model(tiny_encoder):
    torch.manual_seed(0)
    return TaskModel(tiny_encoder, 3)


def _explicit(model, forward, examples, names):
    """Per-example gradients by plain autograd, one unpadded example at a time.

    Returns (n, C, P) float64 gradients and (n, C) outputs.
    """
    params = dict(model.named_parameters())
    model.eval()
    grads, outs = [], []
    for ex in examples:
        out = forward(ex)
        rows = []
        for c in range(out.shape[0]):
            ps = [params[n] for n in names]
            # a parameter the output does not depend on has gradient zero (allow_unused
            # returns None for it); the eNTK code must give zeros there too
            g = torch.autograd.grad(out[c], ps, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                                   for p, x in zip(ps, g, strict=True)]).double())
        grads.append(torch.stack(rows))
        outs.append(out.detach().double())
    return torch.stack(grads), torch.stack(outs)


def _sign(G):
    top = G.abs().amax(-1, keepdim=True)
    return torch.where(G.abs() > EPS * top, torch.sign(G), torch.zeros_like(G))


def _classifier_forward(model):
    tok = model.encoder.tokenizer
    return lambda text: model(dict(tok([text], return_tensors="pt")))[0]


# -- parameter subsets --------------------------------------------------------------------
def test_parameter_subsets_pick_exactly_the_expected_names(task_model):
    form = ClassifierFormulation(task_model)
    every = [n for n, _ in task_model.named_parameters()]
    backbone = [n for n in every if n.startswith("backbone.") and "pooler." not in n]
    head = ["head.weight", "head.bias"]
    pick = lambda spec, head_in: select_parameters(  # noqa: E731
        task_model, form.backbone, spec, include_head=head_in, skip=form.skip)
    assert pick("biases", False) == [n for n in backbone if n.endswith("bias")]
    assert pick("biases", True) == [n for n in backbone if n.endswith("bias")] + head
    assert pick("all", False) == backbone
    assert pick("all", True) == backbone + head
    last = [n for n in backbone if n.startswith("backbone.encoder.layer.1.")]
    assert last and pick("lastk:1", False) == last
    both = [n for n in backbone if n.startswith(("backbone.encoder.layer.0.",
                                                 "backbone.encoder.layer.1."))]
    assert pick("lastk:2", True) == both + head
    assert not any("embeddings" in n for n in pick("lastk:2", True))
    with pytest.raises(KernelError, match="more blocks than the model has"):
        pick("lastk:3", True)
    with pytest.raises(KernelError, match="'params' must be"):
        pick("lastk:0", True)
    with pytest.raises(KernelError, match="'params' must be"):
        pick("weights", True)


def test_empty_parameter_selection_is_a_clear_error():
    form = TensorFormulation(nn.Linear(3, 2, bias=False), 2)
    with pytest.raises(KernelError, match="selects no parameters"):
        compute_kernel(form, torch.randn(4, 3), kernel="sgd", params="biases", progress=False)


# -- kernel values against explicit per-example gradients ---------------------------------
@pytest.mark.parametrize("params", ["biases", "lastk:1"])
def test_kernels_equal_explicit_gradient_dot_products(task_model, params):
    texts, _ = make_texts(11, seed=3)
    train, ev = texts[:7], texts[7:]
    form = ClassifierFormulation(task_model)
    km = {k: compute_kernel(form, train, ev, kernel=k, params=params, chunk_size=4,
                            sign_eps=EPS, progress=False) for k in ("sgd", "signgd", "asym")}
    names = km["sgd"].param_names
    G, out = _explicit(task_model, _classifier_forward(task_model), texts, names)
    assert G.shape == (11, 3, km["sgd"].num_params)
    Gt, Ge, St, Se = G[:7], G[7:], _sign(G[:7]), _sign(G[7:])
    dot = lambda a, b: torch.einsum("icp,jcp->cij", a, b).numpy()  # noqa: E731
    scale = np.abs(dot(Gt, Gt)).max()
    np.testing.assert_allclose(km["sgd"].train, dot(Gt, Gt), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(km["sgd"].eval, dot(Ge, Gt), rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(km["signgd"].train, dot(St, St))
    np.testing.assert_array_equal(km["signgd"].eval, dot(Se, St))
    scale_a = np.abs(dot(Gt, St)).max()
    np.testing.assert_allclose(km["asym"].train, dot(Gt, St), rtol=0, atol=1e-5 * scale_a)
    np.testing.assert_allclose(km["asym"].eval, dot(Ge, St), rtol=0, atol=1e-5 * scale_a)
    np.testing.assert_allclose(km["sgd"].f0_train, out[:7].numpy(), atol=1e-5)
    np.testing.assert_allclose(km["sgd"].f0_eval, out[7:].numpy(), atol=1e-5)
    assert km["sgd"].train.dtype == np.float64
    # the asym kernel really is asymmetric, the others are symmetric
    assert not np.allclose(km["asym"].train, km["asym"].train.transpose(0, 2, 1))


def test_sgd_kernel_is_symmetric_psd_and_chunking_does_not_change_it(task_model):
    texts, _ = make_texts(13, seed=4)
    form = ClassifierFormulation(task_model)
    task_model.train()
    attn = task_model.backbone.config._attn_implementation
    one = compute_kernel(form, texts[:9], texts[9:], params="biases", chunk_size=64,
                         progress=False)
    assert task_model.training and task_model.backbone.config._attn_implementation == attn
    for c in range(3):
        K = one.train[c]
        np.testing.assert_allclose(K, K.T, rtol=0, atol=1e-9 * np.abs(K).max())
        assert np.linalg.eigvalsh(K).min() >= -1e-9 * np.abs(K).max()
    # chunks of 2 examples, and a memory budget of 3 training examples per block
    per_example = 3 * one.num_params * 4
    small = compute_kernel(form, texts[:9], texts[9:], params="biases", chunk_size=2,
                           max_memory_mb=3 * per_example / 2**20, progress=False)
    assert small.held_gradient_bytes == 3 * per_example
    assert small.gradient_passes == 3 * (9 + 4) > one.gradient_passes == 9 + 4
    scale = np.abs(one.train).max()
    np.testing.assert_allclose(small.train, one.train, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(small.eval, one.eval, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(small.f0_eval, one.f0_eval, atol=1e-6)


# -- solvers on a linear model: eNTK regression is ridge regression -------------------------
@pytest.fixture()
def linear():
    rng = np.random.default_rng(0)
    d, C = 10, 3
    torch.manual_seed(0)
    model = nn.Linear(d, C, bias=False).double()
    X, Xe = rng.normal(size=(6, d)), rng.normal(size=(4, d))
    y = np.array([0, 1, 2, 0, 1, 2])
    return model, X, Xe, y


def _linear_kernel(model, X, Xe, kernel="sgd"):
    form = TensorFormulation(model, 3)
    return compute_kernel(form, torch.as_tensor(X), torch.as_tensor(Xe), kernel=kernel,
                          params="all", progress=False)


def test_linear_model_kernel_is_the_gram_matrix(linear):
    model, X, Xe, _ = linear
    km = _linear_kernel(model, X, Xe)
    for c in range(3):  # grad_W f_c(x) = e_c x^T, so K_c = X X^T for every output
        np.testing.assert_allclose(km.train[c], X @ X.T, rtol=1e-12)
        np.testing.assert_allclose(km.eval[c], Xe @ X.T, rtol=1e-12)
    W0 = model.weight.detach().numpy()
    np.testing.assert_allclose(km.f0_eval, Xe @ W0.T, rtol=1e-12)


@pytest.mark.parametrize("ridge", [0.0, 1e-2, 0.5])
def test_entk_regression_equals_closed_form_ridge(linear, ridge):
    from sklearn.linear_model import Ridge

    model, X, Xe, y = linear
    km = _linear_kernel(model, X, Xe)
    Y = one_hot(y, 3)
    lam = ridge * np.linalg.norm(X @ X.T, 2)
    if ridge == 0:  # n < d: the minimum-norm interpolant
        W = (np.linalg.pinv(X) @ Y).T
    else:
        W = Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(X, Y).coef_
    explicit = Xe @ np.linalg.solve(X.T @ X + lam * np.eye(10), X.T @ Y) if ridge else None
    pred = KernelRegression(ridge=ridge).fit(km.train, Y).predict(km.eval)
    np.testing.assert_allclose(pred, Xe @ W.T, atol=1e-9)
    if explicit is not None:
        np.testing.assert_allclose(pred, explicit, atol=1e-9)
    # residual to f0: ridge regression centred at the initial weights W0
    W0 = model.weight.detach().numpy()
    res = KernelRegression(ridge=ridge, fit_residual=True).fit(km.train, Y, f0=km.f0_train)
    if ridge == 0:
        W_res = W0 + (np.linalg.pinv(X) @ (Y - X @ W0.T)).T
    else:
        W_res = W0 + Ridge(alpha=lam, fit_intercept=False).fit(X, Y - X @ W0.T).coef_
    np.testing.assert_allclose(res.predict(km.eval, f0=km.f0_eval), Xe @ W_res.T, atol=1e-9)
    with pytest.raises(ValueError, match="needs the initial outputs"):
        KernelRegression(fit_residual=True).fit(km.train, Y)


def test_entk_regression_with_more_examples_than_features_is_least_squares():
    rng = np.random.default_rng(1)
    X, Xe = rng.normal(size=(20, 4)), rng.normal(size=(5, 4))
    y = rng.normal(size=20)
    km = compute_kernel(TensorFormulation(nn.Linear(4, 1, bias=False).double(), 1),
                        torch.as_tensor(X), torch.as_tensor(Xe), params="all", progress=False)
    pred = KernelRegression(ridge=0.0).fit(km.train, y[:, None]).predict(km.eval)[:, 0]
    np.testing.assert_allclose(pred, Xe @ np.linalg.lstsq(X, y, rcond=None)[0], atol=1e-9)


def test_kernel_logistic_and_svm_equal_their_linear_counterparts(linear):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    model, X, Xe, y = linear
    rng = np.random.default_rng(2)
    X, Xe = rng.normal(size=(40, 10)), rng.normal(size=(15, 10))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 1).astype(int)
    km = _linear_kernel(model, X, Xe)
    klr = KernelLogistic(C=0.7).fit(km.train, y)
    lin = LogisticRegression(C=0.7, max_iter=5000).fit(X, y)
    np.testing.assert_allclose(klr.decision_function(km.eval), lin.decision_function(Xe),
                               atol=2e-3)
    np.testing.assert_array_equal(klr.predict(km.eval), lin.predict(Xe))
    svm = KernelSVM(C=0.7).fit(km.train, y)
    np.testing.assert_allclose(svm.decision_function(km.eval),
                               SVC(kernel="linear", C=0.7).fit(X, y).decision_function(Xe),
                               atol=1e-6)
    asym = _linear_kernel(model, X, Xe, kernel="asym")
    with pytest.raises(ValueError, match="needs a symmetric kernel"):
        KernelSVM().fit(asym.train, y)


# -- prompt formulation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mlm(tiny_model_dir):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval(), tok


def test_prompt_formulation_matches_explicit_mlm_gradients(tiny_mlm):
    model, tok = tiny_mlm
    form = PromptFormulation(model, tok, ["good", "bad"], template="{text} it was {mask} .",
                             max_length=32)
    texts, _ = make_texts(8, seed=5)
    km = compute_kernel(form, texts[:5], texts[5:], kernel="sgd", params="lastk:1",
                        include_head=True, chunk_size=3, progress=False)
    assert any(n.startswith("cls.") for n in km.param_names)
    ids = tok.convert_tokens_to_ids(["good", "bad"])

    def forward(text):
        enc = tok([f"{text} it was {tok.mask_token} ."], return_tensors="pt")
        pos = int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0])
        return model(**enc).logits[0, pos, ids]

    G, out = _explicit(model, forward, texts, km.param_names)
    dot = lambda a, b: torch.einsum("icp,jcp->cij", a, b).numpy()  # noqa: E731
    scale = np.abs(dot(G[:5], G[:5])).max()
    np.testing.assert_allclose(km.train, dot(G[:5], G[:5]), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(km.eval, dot(G[5:], G[:5]), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(km.f0_train, out[:5].numpy(), atol=1e-4)


def test_prompt_formulation_refuses_bad_label_words_and_templates(tiny_mlm):
    model, tok = tiny_mlm
    assert "goodness" not in tok.get_vocab()
    with pytest.raises(KernelError, match="'goodness' must be a single known token"):
        PromptFormulation(model, tok, ["good", "goodness"])
    with pytest.raises(KernelError, match="distinct"):
        PromptFormulation(model, tok, ["good", "good"])
    with pytest.raises(KernelError, match="exactly one '\\{mask\\}'"):
        PromptFormulation(model, tok, ["good", "bad"], template="{text} it was good.")


# -- settings, the comparison and the rank method ------------------------------------------
def test_settings_validate_with_expected_and_got():
    with pytest.raises(ValueError, match="'kernel' must be one of .*got 'adam'"):
        KernelSettings(kernel="adam")
    with pytest.raises(ValueError, match="needs solver='regression'; got 'svm'"):
        KernelSettings(kernel="asym", solver="svm")
    with pytest.raises(KernelError, match="lastk:K"):
        KernelSettings(params="last")
    assert KernelSettings(params="lastk:2").to_dict()["params"] == "lastk:2"


def test_few_shot_draws_k_per_class(small_task):
    s = few_shot(small_task.train, 3, label_kind="classification", seed=1)
    assert np.bincount(s.labels).tolist() == [3, 3]
    assert few_shot(small_task.train, 3, label_kind="classification", seed=1).texts == s.texts


def test_kernel_vs_finetune_report(tiny_encoder):
    texts, labels = make_texts(80, seed=7)
    task = make_task("toy", texts, labels, seed=0)
    for solver in ("regression", "logistic", "svm"):
        report = kernel_vs_finetune(
            task, tiny_encoder, shots=6, seed=1, max_eval=12, progress=False,
            run_finetune=solver == "regression",
            settings=KernelSettings(params="biases", solver=solver))
        assert report.num_train == 12 and report.num_eval == 12
        assert 0.0 <= report.kernel_metrics["accuracy"] <= 1.0
    assert report.finetune_metrics is None
    d = kernel_vs_finetune(task, tiny_encoder, shots=6, seed=1, max_eval=12,
                           progress=False).to_dict()
    assert 0.0 <= d["finetune_metrics"]["accuracy"] <= 1.0 and d["timings"]["finetune"] > 0
    json.dumps(d)
    assert "kernel-predicted" in str(report)


def test_kernel_is_a_builtin_method_and_the_register_hook_still_works():
    # The kernel scorer lives with the others: no import side effect registers it.
    assert "kernel" in METHODS and "kernel" in available_methods()
    assert isinstance(get_scorer("kernel", shots=2), KernelScorer)
    assert register_scorer(KernelScorer) is KernelScorer  # idempotent

    class Other(KernelScorer):
        pass

    with pytest.raises(ValueError, match="already taken"):
        register_scorer(Other)
    with pytest.raises(ValueError, match="Scorer subclass"):
        register_scorer(int)

    class Extra(Scorer):
        name = "test-extra"

    try:
        assert register_scorer(Extra) is Extra
        assert "test-extra" in available_methods() and "test-extra" not in METHODS
    finally:
        SCORERS.pop("test-extra", None)


def test_rank_with_kernel_method(tmp_path, tiny_model_dir):
    from stepstone.esm.registry import Registry
    from stepstone.finetune.build import BuildSettings, build_registry
    from stepstone.finetune.train import FinetuneSettings
    from stepstone.selection.ranking import rank

    enc = load_encoder(str(tiny_model_dir), max_length=32)
    tasks = [make_task(f"src{i}", *make_texts(40, seed=20 + i)) for i in range(2)]
    fast = dict(max_examples=24, max_eval=8, finetune=FinetuneSettings(epochs=1, batch_size=8))
    build_registry(tmp_path / "kept", tasks, encoder=enc, progress=False,
                   settings=BuildSettings(keep_models=True, **fast))
    build_registry(tmp_path / "bare", tasks[:1], encoder=enc, progress=False,
                   settings=BuildSettings(**fast))
    target = make_task("tgt", *make_texts(40, seed=98))
    r = rank(target, tmp_path / "kept", "kernel", encoder=enc, cache=False, progress=False,
             scorer_options={"shots": 4, "eval_examples": 16})
    assert sorted(r.task_ids) == ["src0", "src1"] and not r.errors
    assert all(0.0 <= row.score <= 1.0 for row in r.rows)
    assert r.settings["shots"] == 4 and r.settings["kernel"] == "sgd"
    # no kept model among the candidates: an error naming the build flag, not an empty table
    from stepstone.esm.errors import ConfigError

    with pytest.raises(ConfigError, match="kept none for its 1 candidate.*--keep-models"):
        rank(target, tmp_path / "bare", "kernel", encoder=enc, cache=False, progress=False,
             scorer_options={"shots": 4})
    kept_id = Registry(tmp_path / "kept").entries()[0].id
    tuned = source_encoder(kept_id, enc, registry=str(tmp_path / "kept"), progress=False)
    assert tuned.fingerprint != enc.fingerprint and tuned.pooling == enc.pooling
    bare_id = Registry(tmp_path / "bare").entries()[0].id
    with pytest.raises(KernelError, match="no kept fine-tuned model"):
        source_encoder(bare_id, enc, registry=str(tmp_path / "bare"), progress=False)


def test_cli_kernel_command(tmp_path, tiny_model_dir, capsys):
    import pandas as pd

    from stepstone.cli import main

    texts, labels = make_texts(60, seed=8)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "t.csv", index=False)
    rc = main(["kernel", str(tmp_path / "t.csv"), "--encoder", str(tiny_model_dir),
               "--max-length", "32", "--shots", "4", "--max-eval", "10", "--params", "lastk:1",
               "--kernel", "signgd", "--ft-epochs", "1", "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["kernel"] == "signgd" and out["settings"]["params"] == "lastk:1"
    assert out["num_train"] == 8 and out["finetune_settings"]["epochs"] == 1
    assert {"kernel_metrics", "finetune_metrics", "timings"} <= set(out)
    rc = main(["kernel", str(tmp_path / "t.csv"), "--encoder", str(tiny_model_dir),
               "--params", "weights", "--quiet"])
    assert rc == 2 and "'params' must be" in capsys.readouterr().err


@pytest.mark.slow
def test_real_encoder_biases_kernel_on_a_small_slice():
    from stepstone.esm.catalog import load_builtin

    t0 = time.perf_counter()
    task = load_builtin("sms_spam")
    report = kernel_vs_finetune(task, load_encoder(), shots=4, seed=0, max_eval=24,
                                run_finetune=False, progress=False,
                                settings=KernelSettings(params="biases"))
    assert report.num_params > 20_000 and report.num_train == 8
    assert 0.0 <= report.kernel_metrics["accuracy"] <= 1.0
    assert time.perf_counter() - t0 < 30



def test_source_encoder_fine_tunes_a_builtin_source(tiny_encoder, small_task, monkeypatch):
    import stepstone.esm.catalog
    from stepstone.finetune.train import FinetuneSettings

    # a stand-in built-in task: the path under test is "built-in id -> fine-tune here"
    monkeypatch.setattr(stepstone.esm.catalog, "builtin_ids", lambda: ["toy_sentiment"])
    monkeypatch.setattr(stepstone.esm.catalog, "load_builtin", lambda task_id: small_task)
    for spec in ("toy_sentiment", "builtin:toy_sentiment"):
        tuned = source_encoder(spec, tiny_encoder, max_examples=16, progress=False,
                               settings=FinetuneSettings(epochs=1, batch_size=8))
        assert tuned.fingerprint != tiny_encoder.fingerprint
        assert tuned.model is not tiny_encoder.model
        assert tuned.max_length == tiny_encoder.max_length


def test_prompt_formulation_batches_on_the_model_device(tiny_mlm):
    """Weights on ``meta``, forward guarded (tests/conftest.py): a batch left on the CPU
    fails the guard."""
    import copy

    from tests.conftest import ReachedForward, guard_devices

    model, tok = tiny_mlm
    meta = guard_devices(copy.deepcopy(model).to("meta"))
    form = PromptFormulation(meta, tok, ["good", "bad"], max_length=32)
    texts, _ = make_texts(3)
    with pytest.raises(ReachedForward):
        compute_kernel(form, texts, progress=False)
