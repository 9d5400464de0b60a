"""The empirical neural tangent kernel (eNTK) of a model, one kernel per output.

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
``jacrev`` over the C outputs) on a chosen parameter subset (:func:`select_parameters`),
chunk by chunk, with the held gradients bounded by ``max_memory_mb``; dot products
accumulate in float64.

What ``f`` is comes from a :class:`Formulation` (the concrete ones are in
:mod:`stepstone.selection.entk_formulations`); the solvers that turn kernels into
predictions are in :mod:`stepstone.selection.entk_solvers`. Uses: the ``kernel`` rank
method (:class:`stepstone.selection.scorers.KernelScorer`) and the comparison with
real fine-tuning (:func:`stepstone.finetune.kernel.kernel_vs_finetune`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stepstone.esm.encoder import find_layer_list
from stepstone.esm.errors import StepstoneError

KernelKind = Literal["sgd", "signgd", "asym"]
KERNELS: tuple[str, ...] = ("sgd", "signgd", "asym")


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


# -- the formulation interface (implementations: stepstone.selection.entk_formulations) --
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
