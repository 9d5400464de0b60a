"""The kernel view of fine-tuning: empirical NTK (eNTK) kernels, solvers and uses.

Malladi, Wettig, Yu, Chen, Arora, "A Kernel-Based View of Language Model
Fine-Tuning", ICML 2023 (arXiv 2210.05643): prompt-based fine-tuning of a
pre-trained LM on a small target often behaves like kernel regression with the
empirical neural tangent kernel of the model at its starting point,

    SGD      K_c(x, x') = <grad_theta f_c(x), grad_theta f_c(x')>
    SignGD   K_c(x, x') = <sign grad_theta f_c(x), sign grad_theta f_c(x')>
    Asym     K_c(x, x') = <grad_theta f_c(x), sign grad_theta f_c(x')>   (x' a training
             example: the kernel of Adam / SignGD's first-order dynamics)

with one kernel per output ``c`` (the diagonal blocks of the eNTK, as in the
paper's code). Gradients are taken with ``torch.func`` (``vmap`` over examples of
``jacrev`` over the C outputs) on a chosen parameter subset, chunk by chunk, with
the held gradients bounded by ``max_memory_mb``; dot products accumulate in
float64.

Three formulations give ``f``: :class:`ClassifierFormulation` (an encoder with a
linear head, works with the default encoder), :class:`PromptFormulation` (the
logits of label words at a ``[MASK]`` under an MLM head, the paper's setting) and
:class:`TensorFormulation` (any module on tensors; used to check the solvers on a
linear model, where eNTK regression is ordinary ridge regression).

Uses: :func:`kernel_vs_finetune` (``stepstone kernel``) puts the kernel-predicted
accuracy beside real fine-tuning on the same few-shot sample, and
:class:`KernelScorer` (``rank --method kernel``) scores kept source models by the
kernel's held-out accuracy on the target.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stepstone.esm.data import Split, Task
from stepstone.esm.encoder import Encoder, find_layer_list, pad_batch
from stepstone.esm.errors import ConfigError, StepstoneError
from stepstone.finetune.train import FinetuneSettings, TaskModel, evaluate, finetune
from stepstone.selection.scorers import Scorer, Scores, register_scorer, score_kept_models

logger = logging.getLogger(__name__)

KernelKind = Literal["sgd", "signgd", "asym"]
KERNELS: tuple[str, ...] = ("sgd", "signgd", "asym")
SolverName = Literal["regression", "logistic", "svm"]
SOLVERS: tuple[str, ...] = ("regression", "logistic", "svm")


class KernelError(StepstoneError, ValueError):
    """A kernel cannot be computed as asked (empty parameter subset, bad label word...)."""


# -- parameter subsets ------------------------------------------------------------------
def parse_params(spec: str) -> tuple[str, int | None]:
    """``'biases'``, ``'all'`` or ``'lastk:K'`` -> (kind, K)."""
    if spec in ("biases", "all"):
        return spec, None
    if spec.startswith("lastk:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "lastk", k
    raise KernelError(f"'params' must be 'biases', 'all' or 'lastk:K' with K >= 1; got {spec!r}.")


def select_parameters(model: nn.Module, backbone: nn.Module, spec: str, *,
                      include_head: bool, skip: Sequence[str] = ()) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters the kernel uses.

    ``backbone`` is the transformer inside ``model``; every other parameter of
    ``model`` is the head. ``spec``: ``biases`` (every backbone parameter whose name
    ends in ``bias``, LayerNorm biases included; BitFit's subset), ``lastk:K`` (all
    parameters of the last K transformer blocks), ``all`` (the whole backbone).
    ``include_head`` adds every head parameter. Names containing one of ``skip``
    (e.g. an unused pooler) are left out.

    Raises
    ------
    KernelError
        When the selection is empty, or K exceeds the number of blocks.
    """
    kind, k = parse_params(spec)
    prefix = next((n for n, m in model.named_modules() if m is backbone), None)
    if prefix is None:
        raise KernelError(f"The backbone is not a submodule of {type(model).__name__}.")
    prefix = f"{prefix}." if prefix else ""
    block_prefixes: tuple[str, ...] = ()
    if kind == "lastk":
        blocks = find_layer_list(backbone)
        if k > len(blocks):
            raise KernelError(f"'lastk:{k}' asks for more blocks than the model has "
                              f"({len(blocks)}).")
        wanted = {id(b) for b in list(blocks)[len(blocks) - k:]}
        block_prefixes = tuple(f"{prefix}{n}." for n, m in backbone.named_modules()
                               if id(m) in wanted)
    names = []
    for name, _ in model.named_parameters():
        if any(s in name for s in skip):
            continue
        if backbone is model or name.startswith(prefix):
            chosen = (kind == "all" or (kind == "biases" and name.endswith("bias"))
                      or (kind == "lastk" and name.startswith(block_prefixes)))
        else:
            chosen = include_head
        if chosen:
            names.append(name)
    if not names:
        raise KernelError(f"The parameter subset {spec!r} (include_head={include_head}) "
                          f"selects no parameters of {type(model).__name__}; expected at "
                          "least one.")
    return names


# -- formulations: f(x) as a function of the parameters, one example at a time ----------
class Formulation(nn.Module):
    """How a model's C outputs on one example are computed.

    Subclasses wrap the model as ``self.model`` and implement :meth:`collate`
    (inputs -> dict of batched tensors, leading dim = examples), :meth:`lengths`
    (for length-sorted chunks) and :meth:`forward` (one example's tensors, without
    the batch dimension -> outputs of shape (C,)). ``backbone`` and ``skip`` define
    the parameter subsets (:func:`select_parameters`).
    """

    num_outputs: int
    skip: tuple[str, ...] = ()

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Batched tensors on :attr:`device`."""
        raise NotImplementedError

    def lengths(self, inputs: Sequence[Any]) -> np.ndarray:
        return np.ones(len(inputs))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def kernel_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) and, for HF models, eager attention while inside.

        Eager attention with an explicit additive 4-D mask has no data-dependent
        branches, so ``vmap`` runs over examples; SDPA's backward has no batching
        rule and would fall back to a slow loop.
        """
        was_training = self.model.training
        hf = self.model if hasattr(self.model, "set_attn_implementation") else None
        if hf is None and hasattr(self.backbone, "set_attn_implementation"):
            hf = self.backbone
        previous = getattr(getattr(hf, "config", None), "_attn_implementation", None)
        self.model.eval()
        if hf is not None and previous != "eager":
            hf.set_attn_implementation("eager")
        try:
            yield
        finally:
            if hf is not None and previous not in (None, "eager"):
                hf.set_attn_implementation(previous)
            self.model.train(was_training)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(L,) 0/1 mask -> (1, 1, 1, L) additive mask (0 where kept, dtype min where padded)."""
    return ((1.0 - mask.to(dtype)) * torch.finfo(dtype).min)[None, None, None, :]


class TensorFormulation(Formulation):
    """Any module mapping a float tensor (b, ...) to outputs (b, C); no head."""

    def __init__(self, model: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.model = model
        self.num_outputs = int(num_outputs)

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def collate(self, inputs) -> dict[str, torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        return {"x": torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor)
                                     else inputs, dtype=dtype, device=self.device)}

    def forward(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(example["x"][None])[0]


class _TextFormulation(Formulation):
    tokenizer: Any
    max_length: int

    def _run(self, example: dict[str, torch.Tensor], model: nn.Module):
        kwargs = {"input_ids": example["input_ids"][None],
                  "attention_mask": _additive_mask(example["attention_mask"],
                                                   self.param_dtype)}
        if "token_type_ids" in example:
            kwargs["token_type_ids"] = example["token_type_ids"][None]
        return model(**kwargs)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class ClassifierFormulation(_TextFormulation):
    """f(x) = head(pool(encoder(x))): a :class:`~stepstone.finetune.train.TaskModel`'s logits.

    The head may be freshly initialised (its random init is then part of f0 and of
    the head-excluded kernel) or trained; dropout is off.
    """

    def __init__(self, model: TaskModel) -> None:
        super().__init__()
        self.model = model
        self.encoder: Encoder = model.encoder
        self.tokenizer = model.encoder.tokenizer
        self.max_length = model.encoder.max_length
        self.num_outputs = int(model.head.out_features)
        # The HF pooler is unused unless the encoder pools with it: its gradient is 0.
        self.skip = () if model.encoder.pooling == "pooler" else ("pooler.",)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def lengths(self, inputs) -> np.ndarray:
        return np.array([len(x) for x in self.encoder.tokenize(list(inputs))["input_ids"]])

    def collate(self, inputs) -> dict[str, torch.Tensor]:
        return self.encoder.collate(list(inputs))

    def forward(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self._run(example, self.model.backbone)
        pooled = self.encoder.pool(out, example["attention_mask"][None])
        return self.model.head(self.model.dropout(pooled))[0]


class PromptFormulation(_TextFormulation):
    """Label-word logits at a ``[MASK]`` under a masked-LM head (Malladi et al. 2023, §4).

    ``template`` holds ``{text}`` and ``{mask}``; f_c(x) is the MLM logit of
    ``label_words[c]`` at the mask position of ``template`` filled with x (the
    text is truncated so the whole prompt fits ``max_length``). Each label word
    must be one token of the tokenizer's vocabulary.
    """

    def __init__(self, model: nn.Module, tokenizer, label_words: Sequence[str], *,
                 template: str = "{text} It was {mask}.", max_length: int = 128) -> None:
        super().__init__()
        if "{text}" not in template or template.count("{mask}") != 1:
            raise KernelError("'template' must contain '{text}' and exactly one '{mask}'; "
                              f"got {template!r}.")
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise KernelError("The prompt formulation needs a tokenizer with a mask token.")
        if len(label_words) < 1:
            raise KernelError("'label_words' must name one word per class; got none.")
        ids = []
        for word in label_words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
                raise KernelError(
                    f"Label word {word!r} must be a single known token; the tokenizer makes "
                    f"{tokenizer.convert_ids_to_tokens(pieces)}.")
            ids.append(pieces[0])
        if len(set(ids)) != len(ids):
            raise KernelError(f"Label words must be distinct tokens; got {list(label_words)}.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.template = template
        self.num_outputs = len(ids)
        self.register_buffer("label_ids", torch.tensor(ids), persistent=False)
        before, after = template.split("{text}")
        self._parts = [self._piece(before), self._piece(after)]
        budget = self.max_length - 2 - len(self._parts[0]) - len(self._parts[1])
        if budget < 1:
            raise KernelError(f"The template leaves no room for text at max_length="
                              f"{self.max_length}.")
        self._budget = budget

    def _piece(self, part: str) -> list[int]:
        ids: list[int] = []
        chunks = part.split("{mask}")
        for i, chunk in enumerate(chunks):
            if chunk.strip():
                ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            if i < len(chunks) - 1:
                ids.append(self.tokenizer.mask_token_id)
        return ids

    @property
    def backbone(self) -> nn.Module:
        return self.model.base_model

    def _encode(self, inputs) -> dict[str, list[list[int]]]:
        texts = [x if isinstance(x, str) else f"{x[0]} {x[1]}" for x in inputs]
        bodies = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        tok = self.tokenizer
        rows = [[tok.cls_token_id, *self._parts[0], *body[:self._budget], *self._parts[1],
                 tok.sep_token_id] for body in bodies]
        return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}

    def lengths(self, inputs) -> np.ndarray:
        return np.array([len(r) for r in self._encode(inputs)["input_ids"]])

    def collate(self, inputs) -> dict[str, torch.Tensor]:
        batch = pad_batch(self.tokenizer, self._encode(inputs), device=self.device)
        batch["mask_pos"] = (batch["input_ids"] == self.tokenizer.mask_token_id).long().argmax(1)
        return batch

    def forward(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._run({k: v for k, v in example.items() if k != "mask_pos"},
                           self.model).logits[0]                     # (L, vocab)
        at_mask = logits.index_select(0, example["mask_pos"].reshape(1))[0]
        return at_mask.index_select(0, self.label_ids)


# -- the kernel -------------------------------------------------------------------------
@dataclass
class KernelMatrices:
    """eNTK matrices for one parameter subset and kernel formula.

    Attributes
    ----------
    train : float64 array of shape (C, n, n)
        ``train[c, i, j] = K_c(x_i, x_j)`` on the training examples.
    eval : float64 array of shape (C, m, n) or None
        ``eval[c, e, j] = K_c(x_e, x_j)``: rows are evaluation examples, columns
        training examples (for ``asym`` the columns carry the sign).
    f0_train, f0_eval : float64 arrays of shape (n, C) and (m, C)
        The model's outputs at its starting point.
    """

    kernel: str
    train: np.ndarray
    eval: np.ndarray | None
    f0_train: np.ndarray
    f0_eval: np.ndarray | None
    param_names: list[str]
    num_params: int
    seconds: float
    gradient_passes: int
    held_gradient_bytes: int

    def __post_init__(self) -> None:
        c, n, n2 = self.train.shape
        if n != n2 or self.f0_train.shape != (n, c):
            raise ValueError(f"Expected train kernel (C, n, n) and f0 (n, C); got "
                             f"{self.train.shape} and {self.f0_train.shape}.")


class _GradientSource:
    """Per-example gradients of the selected parameters, chunk by chunk."""

    def __init__(self, form: Formulation, names: list[str]) -> None:
        from torch.func import functional_call, jacrev, vmap

        self.form = form
        params = dict(form.model.named_parameters())
        self.params = {n: params[n].detach() for n in names}
        self.num_params = sum(p.numel() for p in self.params.values())

        def with_aux(p, example):
            # The formulation's forward reads self.model: swap the selected parameters
            # there (the others stay the module's own).
            y = functional_call(form, {f"model.{k}": v for k, v in p.items()}, (example,))
            return y, y.detach()

        self._jac = vmap(jacrev(with_aux, has_aux=True), in_dims=(None, 0))

    def __call__(self, inputs: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients {name: (b, C, numel)} float32 and outputs (b, C) for ``inputs``."""
        batch = self.form.collate(inputs)
        # torch.func transforms ignore an outer no_grad; it only stops autograd from
        # also recording a graph to the module's own (non-selected) parameters.
        with torch.no_grad():
            jac, out = self._jac(self.params, batch)
        grads = {n: g.detach().reshape(g.shape[0], g.shape[1], -1) for n, g in jac.items()}
        out = out.detach()
        return grads, out


def sign_features(grads: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """sign(g), with entries |g| <= eps * max |g| (per example and output) set to 0.

    Some gradients are exactly zero in exact arithmetic (an attention key bias: softmax
    ignores a shift of all scores) and float32 leaves ~1e-11 noise there, whose sign
    would otherwise be random; the cut makes the sign kernels reproducible.
    """
    top = torch.stack([g.abs().amax(-1) for g in grads.values()], -1).amax(-1)  # (b, C)
    cut = (eps * top)[..., None]
    return {n: torch.where(g.abs() > cut, torch.sign(g), torch.zeros_like(g))
            for n, g in grads.items()}


def _apply(grads: dict[str, torch.Tensor], signed: bool, eps: float
           ) -> dict[str, torch.Tensor]:
    return sign_features(grads, eps) if signed else grads


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over parameters of <a, b> per output: (C, rows, cols), float64 products."""
    total = None
    for name, ga in a.items():
        part = torch.einsum("bcp,ecp->cbe", ga.double(), b[name].double())
        total = part if total is None else total + part
    return total


def compute_kernel(
    form: Formulation,
    train: Sequence[Any],
    eval: Sequence[Any] | None = None,
    *,
    kernel: KernelKind = "sgd",
    params: str = "biases",
    include_head: bool = True,
    chunk_size: int = 8,
    max_memory_mb: float = 1024.0,
    sign_eps: float = 1e-6,
    progress: bool = True,
) -> KernelMatrices:
    """eNTK matrices of ``form``'s outputs on ``train`` (and ``eval`` against ``train``).

    Parameters
    ----------
    form : Formulation
        The model and how its C outputs are read (:class:`ClassifierFormulation`,
        :class:`PromptFormulation`, :class:`TensorFormulation`).
    train, eval : sequences of inputs (texts, or rows of a float array)
    kernel : {'sgd', 'signgd', 'asym'}
        Malladi et al. 2023 eq. (SGD), the SignGD kernel, and the asymmetric
        Adam/SignGD kernel ``<grad f(x), sign grad f(x_train)>``.
    params, include_head
        The parameter subset (:func:`select_parameters`).
    chunk_size : int
        Examples per ``vmap`` call (bounds activation memory).
    max_memory_mb : float
        Budget for the training gradients held at once (float32, C x P per
        example). When they do not fit, the training set is processed in blocks
        and other examples' gradients are recomputed once per block.
    sign_eps : float
        For the sign kernels: gradient entries at most ``sign_eps`` times the
        largest one (same example and output) count as 0 (:func:`sign_features`).

    Returns
    -------
    KernelMatrices
    """
    if kernel not in KERNELS:
        raise KernelError(f"'kernel' must be one of {list(KERNELS)}; got {kernel!r}.")
    if chunk_size < 1 or max_memory_mb <= 0 or not 0 <= sign_eps < 1:
        raise KernelError(f"Need chunk_size >= 1, max_memory_mb > 0 and 0 <= sign_eps < 1; "
                          f"got {chunk_size}, {max_memory_mb}, {sign_eps}.")
    names = select_parameters(form.model, form.backbone, params, include_head=include_head,
                              skip=form.skip)
    n, m = len(train), 0 if eval is None else len(eval)
    if n == 0:
        raise KernelError("'train' must hold at least one example; got none.")
    t0 = time.perf_counter()
    source = _GradientSource(form, names)
    C, P = form.num_outputs, source.num_params
    per_example = C * P * 4
    block = max(chunk_size, int(max_memory_mb * 2**20 // per_example))
    block = min(block, n)
    n_blocks = math.ceil(n / block)
    row_signed = kernel == "signgd"
    col_signed = kernel in ("signgd", "asym")

    def chunks(items, lengths):
        order = np.argsort(-lengths, kind="stable")
        for s in range(0, len(order), chunk_size):
            idx = order[s:s + chunk_size]
            yield idx, [items[i] for i in idx]

    train_list = list(train) if not isinstance(train, (torch.Tensor, np.ndarray)) else train
    eval_list = None if eval is None else (
        list(eval) if not isinstance(eval, (torch.Tensor, np.ndarray)) else eval)
    train_len = form.lengths(train_list)
    eval_len = None if eval_list is None else form.lengths(eval_list)
    K_train = np.zeros((C, n, n))
    K_eval = None if eval is None else np.zeros((C, m, n))
    f0_train = np.zeros((n, C))
    f0_eval = None if eval is None else np.zeros((m, C))
    passes = (n + m) * n_blocks  # every block: its own rows, the other rows, eval
    bar = tqdm(total=passes, desc=f"eNTK ({kernel}, {params})", unit="example",
               disable=not progress, leave=False)
    done = 0
    with form.kernel_mode():
        for b0 in range(0, n, block):
            cols = np.arange(b0, min(b0 + block, n))
            held: dict[str, list[torch.Tensor]] = {}
            held_idx: list[np.ndarray] = []
            # 1. the training examples of this block (their gradients are held)
            sub = [train_list[i] for i in cols]
            for idx, items in chunks(sub, train_len[cols]):
                grads, out = source(items)
                held_idx.append(cols[idx])
                for name, g in grads.items():
                    held.setdefault(name, []).append(g)
                f0_train[cols[idx]] = out.double().cpu().numpy()
                bar.update(len(idx))
                done += len(idx)
            col_idx = np.concatenate(held_idx)
            G = {name: torch.cat(parts) for name, parts in held.items()}
            del held
            col_feats = _apply(G, col_signed, sign_eps)
            row_feats = _apply(G, row_signed, sign_eps)
            K_train[np.ix_(np.arange(C), col_idx, col_idx)] = \
                _dot(row_feats, col_feats).cpu().numpy()
            # 2. every other training row against this block (recomputed), then eval rows
            others = np.setdiff1d(np.arange(n), cols)
            for rows_all, lens, target, f0 in (
                    (others, train_len[others] if len(others) else None, K_train, None),
                    (np.arange(m), eval_len, K_eval, f0_eval)):
                if target is None or len(rows_all) == 0:
                    continue
                rows_items = ([train_list[i] for i in rows_all] if target is K_train
                              else eval_list)
                for idx, items in chunks(rows_items, lens):
                    grads, out = source(items)
                    r = rows_all[idx]
                    target[np.ix_(np.arange(C), r, col_idx)] = _dot(
                        _apply(grads, row_signed, sign_eps), col_feats).cpu().numpy()
                    if f0 is not None:
                        f0[r] = out.double().cpu().numpy()
                    bar.update(len(idx))
                    done += len(idx)
            del G, col_feats, row_feats
    bar.close()
    return KernelMatrices(kernel, K_train, K_eval, f0_train, f0_eval, names, P,
                          time.perf_counter() - t0, done, block * per_example)


# -- solvers ----------------------------------------------------------------------------
def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices (n,) -> float64 targets (n, num_classes)."""
    out = np.zeros((len(labels), num_classes))
    out[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1.0
    return out


def _check_kernel(K: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 3 or (n is not None and K.shape[2] != n):
        want = "(C, rows, n)" if n is None else f"(C, rows, {n})"
        raise ValueError(f"'{name}' must have shape {want}; got {K.shape}.")
    if not np.isfinite(K).all():
        raise ValueError(f"'{name}' contains NaN or inf.")
    return K


class KernelRegression:
    """Kernel (ridge) regression per output with a relative ridge (Malladi et al. 2023).

    ``alpha_c = (K_c + ridge * ||K_c||_2 I)^+ (Y_c - f0_c)``, prediction
    ``K_c(x, X) alpha_c + f0_c(x)``. ``fit_residual=True`` fits the residual to the
    initial model's outputs ``f0``; otherwise f0 is ignored. With ``ridge=0`` the
    pseudo-inverse gives the minimum-norm interpolant.
    """

    def __init__(self, *, ridge: float = 1e-3, fit_residual: bool = False) -> None:
        if ridge < 0:
            raise ValueError(f"'ridge' must be >= 0; got {ridge}.")
        self.ridge, self.fit_residual = ridge, fit_residual

    def fit(self, K: np.ndarray, Y: np.ndarray, *, f0: np.ndarray | None = None
            ) -> KernelRegression:
        """K: (C, n, n); Y: (n, C) targets (one-hot for classes); f0: (n, C)."""
        K = _check_kernel(K, "K")
        C, n, _ = K.shape
        Y = np.asarray(Y, dtype=np.float64).reshape(n, -1)
        if Y.shape[1] != C:
            raise ValueError(f"'Y' must have shape ({n}, {C}); got {Y.shape}.")
        if self.fit_residual:
            if f0 is None:
                raise ValueError("fit_residual=True needs the initial outputs 'f0'.")
            Y = Y - np.asarray(f0, dtype=np.float64)
        self.alpha_ = np.zeros((n, C))
        for c in range(C):
            A = K[c] + self.ridge * np.linalg.norm(K[c], 2) * np.eye(n)
            self.alpha_[:, c] = np.linalg.lstsq(A, Y[:, c], rcond=None)[0]
        return self

    def predict(self, K_eval: np.ndarray, *, f0: np.ndarray | None = None) -> np.ndarray:
        """K_eval: (C, m, n) -> outputs (m, C)."""
        K_eval = _check_kernel(K_eval, "K_eval", len(self.alpha_))
        out = np.einsum("cmn,nc->mc", K_eval, self.alpha_)
        if self.fit_residual:
            if f0 is None:
                raise ValueError("fit_residual=True needs the initial outputs 'f0'.")
            out = out + np.asarray(f0, dtype=np.float64)
        return out


def _summed(K: np.ndarray) -> np.ndarray:
    """One kernel for all outputs: the mean of the per-output kernels, (rows, n)."""
    return K.mean(0)


def _symmetric(K: np.ndarray) -> np.ndarray:
    Ks = _summed(K)
    if not np.allclose(Ks, Ks.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(Ks).max())):
        raise ValueError("This solver needs a symmetric kernel ('sgd' or 'signgd'); got an "
                         "asymmetric one: use solver='regression' with the 'asym' kernel.")
    return (Ks + Ks.T) / 2


class KernelSVM:
    """scikit-learn's SVC on the precomputed kernel (mean over outputs)."""

    def __init__(self, *, C: float = 1.0) -> None:
        if C <= 0:
            raise ValueError(f"'C' must be > 0; got {C}.")
        self.C = C

    def fit(self, K: np.ndarray, labels: np.ndarray) -> KernelSVM:
        from sklearn.svm import SVC

        self.svc_ = SVC(kernel="precomputed", C=self.C).fit(_symmetric(_check_kernel(K, "K")),
                                                            labels)
        return self

    def decision_function(self, K_eval: np.ndarray) -> np.ndarray:
        """(C, m, n) -> scores (m, num_classes), highest = predicted class."""
        d = self.svc_.decision_function(_summed(_check_kernel(K_eval, "K_eval")))
        return np.stack([-d, d], 1) if d.ndim == 1 else d

    def predict(self, K_eval: np.ndarray) -> np.ndarray:
        return self.svc_.predict(_summed(_check_kernel(K_eval, "K_eval")))


class KernelLogistic:
    """Kernel logistic regression, exactly, through scikit-learn's LogisticRegression.

    With ``K = V diag(s) V^T`` on the training set, the features ``V diag(sqrt s)``
    reproduce K, and an L2 penalty on their weights is the RKHS norm, so the
    representer theorem makes the fit equal to kernel logistic regression;
    evaluation rows map by ``K(x, X) V diag(1/sqrt s)`` (mean kernel over outputs).
    """

    def __init__(self, *, C: float = 1.0, tol: float = 1e-10) -> None:
        if C <= 0:
            raise ValueError(f"'C' must be > 0; got {C}.")
        self.C, self.tol = C, tol

    def fit(self, K: np.ndarray, labels: np.ndarray) -> KernelLogistic:
        from sklearn.linear_model import LogisticRegression

        s, V = np.linalg.eigh(_symmetric(_check_kernel(K, "K")))
        keep = s > self.tol * max(s.max(), 0.0)
        if not keep.any():
            raise KernelError("The kernel has no positive eigenvalue; cannot fit.")
        self.basis_ = V[:, keep] / np.sqrt(s[keep])
        features = V[:, keep] * np.sqrt(s[keep])
        self.model_ = LogisticRegression(C=self.C, max_iter=5000).fit(features, labels)
        return self

    def decision_function(self, K_eval: np.ndarray) -> np.ndarray:
        d = self.model_.decision_function(_summed(_check_kernel(K_eval, "K_eval"))
                                          @ self.basis_)
        return np.stack([-d, d], 1) if d.ndim == 1 else d

    def predict(self, K_eval: np.ndarray) -> np.ndarray:
        return self.model_.classes_[self.decision_function(K_eval).argmax(1)]


# -- settings and the prediction ---------------------------------------------------------
@dataclass
class KernelSettings:
    """How the eNTK is computed and solved (Malladi et al. 2023)."""

    kernel: str = field(default="sgd", metadata={
        "help": "Kernel formula: sgd (<g, g'>), signgd (<sign g, sign g'>), asym "
                "(<g, sign g_train>, Adam's kernel)."})
    params: str = field(default="biases", metadata={
        "help": "Parameter subset: biases, lastk:K (last K blocks) or all."})
    include_head: bool = field(default=True, metadata={
        "help": "Also differentiate the head (the classifier layer)."})
    solver: str = field(default="regression", metadata={
        "help": "regression (kernel ridge), logistic (kernel logistic regression) or svm."})
    ridge: float = field(default=1e-3, metadata={
        "help": "Relative ridge for regression: lambda * ||K||_2 is added to the diagonal."})
    fit_residual: bool = field(default=False, metadata={
        "help": "Regression: fit the residual to the initial model's outputs."})
    C: float = field(default=1.0, metadata={"help": "Inverse regularisation (logistic, svm)."})
    chunk_size: int = field(default=8, metadata={"help": "Examples per vmap call."})
    max_memory_mb: float = field(default=1024.0, metadata={
        "help": "Budget for the held training gradients (MiB)."})
    sign_eps: float = field(default=1e-6, metadata={
        "help": "Sign kernels: gradient entries below this share of the largest count as 0."})

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise KernelError(f"'kernel' must be one of {list(KERNELS)}; got {self.kernel!r}.")
        if self.solver not in SOLVERS:
            raise KernelError(f"'solver' must be one of {list(SOLVERS)}; got {self.solver!r}.")
        parse_params(self.params)
        if (self.ridge < 0 or self.C <= 0 or self.chunk_size < 1 or self.max_memory_mb <= 0
                or not 0 <= self.sign_eps < 1):
            raise KernelError(f"Need ridge >= 0, C > 0, chunk_size >= 1, max_memory_mb > 0, "
                             f"0 <= sign_eps < 1; got {self.ridge}, {self.C}, "
                             f"{self.chunk_size}, {self.max_memory_mb}, {self.sign_eps}.")

        if self.fit_residual and self.solver != "regression":
            raise KernelError(f"'fit_residual' needs solver='regression'; got {self.solver!r}.")
        if self.kernel == "asym" and self.solver != "regression":
            raise KernelError("The asym kernel is not symmetric: it needs solver='regression'; "
                             f"got {self.solver!r}.")

    def kernel_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`compute_kernel` these settings fix."""
        return {"kernel": self.kernel, "params": self.params, "include_head": self.include_head,
                "chunk_size": self.chunk_size, "max_memory_mb": self.max_memory_mb,
                "sign_eps": self.sign_eps}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def solve(km: KernelMatrices, labels: np.ndarray, *, label_kind: str,
          settings: KernelSettings) -> np.ndarray:
    """Fit on ``km.train`` and predict for ``km.eval``: (m, C) scores or (m,) values."""
    if km.eval is None:
        raise ValueError("Need a kernel with evaluation rows ('eval' given to compute_kernel).")
    C = km.train.shape[0]
    if label_kind == "regression":
        if settings.solver != "regression":
            raise KernelError(f"A regression target needs solver='regression'; got "
                             f"{settings.solver!r}.")
        reg = KernelRegression(ridge=settings.ridge, fit_residual=settings.fit_residual)
        reg.fit(km.train, np.asarray(labels, dtype=np.float64)[:, None], f0=km.f0_train)
        return reg.predict(km.eval, f0=km.f0_eval)[:, 0]
    if settings.solver == "regression":
        reg = KernelRegression(ridge=settings.ridge, fit_residual=settings.fit_residual)
        reg.fit(km.train, one_hot(labels, C), f0=km.f0_train)
        return reg.predict(km.eval, f0=km.f0_eval)
    est = (KernelLogistic(C=settings.C) if settings.solver == "logistic"
           else KernelSVM(C=settings.C)).fit(km.train, labels)
    scores = np.full((km.eval.shape[1], C), -np.inf)
    classes = (est.model_ if settings.solver == "logistic" else est.svc_).classes_
    scores[:, classes] = est.decision_function(km.eval)
    return scores


def kernel_metrics(pred: np.ndarray, labels: np.ndarray, label_kind: str) -> dict[str, float]:
    """Accuracy and macro-F1 (classification) or MSE and Pearson r (regression)."""
    from sklearn.metrics import accuracy_score, f1_score

    if label_kind == "classification":
        p = pred.argmax(1)
        return {"accuracy": float(accuracy_score(labels, p)),
                "macro_f1": float(f1_score(labels, p, average="macro"))}
    r = float(np.corrcoef(pred, labels)[0, 1]) if len(labels) > 1 else float("nan")
    return {"mse": float(np.mean((pred - labels) ** 2)), "pearson": r}


def few_shot(split: Split, shots: int, *, label_kind: str, seed: int = 0) -> Split:
    """``shots`` examples per class (all of a smaller class), seeded; regression: ``shots``."""
    if shots < 1:
        raise ConfigError(f"'shots' must be >= 1; got {shots}.")
    rng = np.random.default_rng(seed)
    if label_kind == "regression":
        idx = rng.choice(len(split), size=min(shots, len(split)), replace=False)
    else:
        idx = np.concatenate([rng.choice(np.flatnonzero(split.labels == c),
                                         size=min(shots, int((split.labels == c).sum())),
                                         replace=False)
                              for c in np.unique(split.labels)])
    return split.take(np.sort(idx))


@dataclass
class FewShotFinetuneSettings(FinetuneSettings):
    """Fine-tuning for the kernel comparison: small batches and enough steps to move a
    fresh head (the registry's source defaults would take 1-3 steps on 32 examples)."""

    lr: float = field(default=5e-5, metadata={"help": "AdamW peak learning rate."})
    epochs: int = field(default=10, metadata={"help": "Passes over the few-shot sample."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})


FEW_SHOT_FINETUNE = FewShotFinetuneSettings()


@dataclass
class KernelReport:
    """Kernel-predicted vs actual fine-tuning metrics on one few-shot sample."""

    target: str
    source: str | None
    shots: int
    seed: int
    num_train: int
    num_eval: int
    settings: dict[str, Any]
    kernel_metrics: dict[str, float]
    finetune_metrics: dict[str, float] | None
    initial_metrics: dict[str, float]
    timings: dict[str, float]
    num_params: int
    held_gradient_mb: float
    finetune_settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_eval < 1:
            raise ValueError(f"A report needs train and eval examples; got {self.num_train}, "
                             f"{self.num_eval}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_pandas(self):
        import pandas as pd

        rows = [{"model": "kernel (eNTK)", **self.kernel_metrics},
                {"model": "initial model f0", **self.initial_metrics}]
        if self.finetune_metrics is not None:
            rows.append({"model": "fine-tuned", **self.finetune_metrics})
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        s = self.settings
        src = f" after {self.source}" if self.source else ""
        lines = [f"eNTK vs fine-tuning for {self.target}{src}: {self.shots} shots/class "
                 f"({self.num_train} train), {self.num_eval} eval, seed {self.seed}",
                 f"kernel {s['kernel']}, params {s['params']} (head "
                 f"{'in' if s['include_head'] else 'out'}, {self.num_params:,} parameters), "
                 f"solver {s['solver']}"]
        key = "accuracy" if "accuracy" in self.kernel_metrics else "mse"
        other = "macro_f1" if key == "accuracy" else "pearson"
        lines.append(f"  {'':<22}{key:>10}{other:>10}")
        rows = [("kernel-predicted", self.kernel_metrics), ("initial model", self.initial_metrics)]
        if self.finetune_metrics is not None:
            rows.append(("fine-tuned (actual)", self.finetune_metrics))
        lines += [f"  {name:<22}{m[key]:>10.4f}{m[other]:>10.4f}" for name, m in rows]
        t = self.timings
        lines.append(f"kernel {t['kernel']:.1f}s (held gradients {self.held_gradient_mb:.1f} "
                     f"MiB)" + (f", fine-tuning {t['finetune']:.1f}s" if "finetune" in t
                                else ""))
        return "\n".join(lines)


def kernel_vs_finetune(
    task: Task,
    encoder: Encoder,
    *,
    shots: int = 16,
    seed: int = 0,
    settings: KernelSettings | None = None,
    finetune_settings: FinetuneSettings | None = None,
    max_eval: int | None = 500,
    run_finetune: bool = True,
    source: str | None = None,
    progress: bool = True,
) -> KernelReport:
    """Kernel-predicted accuracy beside real fine-tuning, same sample, seed and start.

    ``shots`` examples per class are drawn from ``task.train`` (seeded); both are
    evaluated on ``task.test`` capped at ``max_eval`` (stratified). The head is
    initialised under ``torch.manual_seed(seed)``; fine-tuning runs on a copy of
    exactly that model with ``finetune_settings`` (default
    :data:`FEW_SHOT_FINETUNE`, its seed replaced by ``seed``). ``encoder`` is used
    as is (pass a source-tuned encoder to predict the transfer from that source).
    """
    settings = settings or KernelSettings()
    ft = dataclasses.replace(finetune_settings or FEW_SHOT_FINETUNE, seed=seed)
    train = few_shot(task.train, shots, label_kind=task.label_kind, seed=seed)
    evalset = task.subsample(max_test=max_eval, seed=seed).test
    torch.manual_seed(seed)
    model = TaskModel(encoder, task.num_labels, dropout=ft.dropout)
    start = copy.deepcopy(model) if run_finetune else None
    km = compute_kernel(ClassifierFormulation(model), train.inputs(), evalset.inputs(),
                        **settings.kernel_options(), progress=progress)
    t_solve = time.perf_counter()
    pred = solve(km, train.labels, label_kind=task.label_kind, settings=settings)
    timings = {"kernel": km.seconds, "solve": time.perf_counter() - t_solve}
    f0 = km.f0_eval[:, 0] if task.label_kind == "regression" else km.f0_eval
    ft_metrics = None
    if start is not None:
        t1 = time.perf_counter()
        finetune(start, train, label_kind=task.label_kind, settings=ft, progress=progress,
                 desc="fine-tuning (actual)")
        ft_metrics = evaluate(start, task, evalset)
        timings["finetune"] = time.perf_counter() - t1
    return KernelReport(task.task_id, source, shots, seed, len(train), len(evalset),
                        settings.to_dict(), kernel_metrics(pred, evalset.labels, task.label_kind),
                        ft_metrics, kernel_metrics(f0, evalset.labels, task.label_kind),
                        {k: round(v, 3) for k, v in timings.items()}, km.num_params,
                        km.held_gradient_bytes / 2**20,
                        ft.to_dict() if run_finetune else None)


def source_encoder(
    source: str,
    encoder: Encoder,
    *,
    registry: str | None = None,
    max_examples: int = 500,
    settings: FinetuneSettings | None = None,
    progress: bool = True,
) -> Encoder:
    """The encoder after fine-tuning on ``source``, to take the eNTK of.

    ``source`` is an ESM id of ``registry`` (default: the shipped one) whose build
    kept the fine-tuned model (``--keep-models``), or a built-in task id (``trec6``
    or ``builtin:trec6``), which is fine-tuned here on at most ``max_examples``
    training examples with ``settings`` (default: the registry build's).

    Raises
    ------
    KernelError
        When the ESM has no kept model.
    """
    from stepstone.esm.catalog import builtin_ids, load_builtin
    from stepstone.esm.data import BUILTIN_PREFIX
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.registry import open_registry

    task_id = source.removeprefix(BUILTIN_PREFIX)
    if source.startswith(BUILTIN_PREFIX) or task_id in builtin_ids():
        task = load_builtin(task_id).subsample(max_train=max_examples, seed=0)
        tuned = encoder.copy()
        ft = settings or FinetuneSettings()
        torch.manual_seed(ft.seed)
        model = TaskModel(tuned, task.num_labels, dropout=ft.dropout)
        finetune(model, task.train, label_kind=task.label_kind, settings=ft, progress=progress,
                 desc=f"fine-tuning source {task_id}")
        return tuned
    reg = open_registry(registry)
    folder = reg.model_dir(source)
    if folder is None:
        raise KernelError(f"ESM {source!r} has no kept fine-tuned model (its registry was built "
                          "without --keep-models); pass a built-in task id to fine-tune the "
                          "source here instead.")
    return load_encoder(str(folder / "encoder"), pooling=encoder.pooling,
                        max_length=encoder.max_length, device=str(encoder.device))


# -- the transferability scorer ----------------------------------------------------------
class KernelScorer(Scorer):
    """``rank --method kernel``: held-out eNTK accuracy with each kept source model.

    For every candidate with a kept fine-tuned model (``registry build
    --keep-models``), the source-tuned encoder gets a fresh head (seeded) and the
    target's few-shot sample (``shots`` per class from the target examples) is
    solved with its eNTK (Malladi et al. 2023); the score is the accuracy on up to
    ``eval_examples`` other target examples (classification), or minus the MSE
    (regression). Slow: one kernel per candidate; for short candidate lists.
    """

    name: ClassVar[str] = "kernel"
    options: ClassVar[tuple[str, ...]] = ("shots", "eval_examples", "seed", "kernel", "params",
                                          "include_head", "solver", "ridge", "prefilter")

    def __init__(self, *, shots: int = 16, eval_examples: int = 200, seed: int = 0,
                 kernel: str = "sgd", params: str = "biases", include_head: bool = True,
                 solver: str = "regression", ridge: float = 1e-3) -> None:
        if shots < 1 or eval_examples < 1:
            raise ConfigError(f"Need shots >= 1 and eval_examples >= 1; got {shots}, "
                             f"{eval_examples}.")
        self.shots, self.eval_examples, self.seed = shots, eval_examples, seed
        self.kernel_settings = KernelSettings(kernel=kernel, params=params,
                                              include_head=include_head, solver=solver,
                                              ridge=ridge)

    def settings(self) -> dict:
        return {"shots": self.shots, "eval_examples": self.eval_examples, "seed": self.seed,
                **{k: v for k, v in self.kernel_settings.to_dict().items()
                   if k in ("kernel", "params", "include_head", "solver", "ridge")}}

    def _split(self, target) -> tuple[Split, Split]:
        labels = np.asarray(target.labels)
        full = Split(tuple(target.texts), labels)
        train = few_shot(full, self.shots, label_kind=target.label_kind, seed=self.seed)
        chosen = set(train.texts)
        rest = np.array([i for i, t in enumerate(target.texts) if t not in chosen])
        if len(rest) == 0:
            raise KernelError(f"The target has no examples left to evaluate the kernel on "
                             f"after {self.shots} shots per class.")
        rng = np.random.default_rng(self.seed)
        rest = np.sort(rng.choice(rest, size=min(self.eval_examples, len(rest)),
                                  replace=False))
        return train, full.take(rest)

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        train, held = self._split(target)
        num_labels = int(np.max(target.labels)) + 1 if target.label_kind == "classification" \
            else 1
        s = self.kernel_settings

        def one(enc) -> float:
            torch.manual_seed(self.seed)
            model = TaskModel(enc, num_labels)
            km = compute_kernel(ClassifierFormulation(model), train.inputs(), held.inputs(),
                                **s.kernel_options(), progress=False)
            pred = solve(km, train.labels, label_kind=target.label_kind, settings=s)
            metrics = kernel_metrics(pred, held.labels, target.label_kind)
            return metrics["accuracy"] if "accuracy" in metrics else -metrics["mse"]

        return score_kept_models(target, registry, entries, one, desc="eNTK per source",
                                 progress=progress, catch=(KernelError,))


register_scorer(KernelScorer)
