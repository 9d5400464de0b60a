"""Formulations: how a model's C outputs ``f(x)`` on one example are computed for the eNTK.

:class:`ClassifierFormulation` (an encoder with a linear head, a
:class:`~stepstone.esm.taskmodel.TaskModel`; works with the default encoder),
:class:`PromptFormulation` (the logits of label words at a ``[MASK]`` under an MLM
head, the setting of Malladi et al. ICML 2023, arXiv 2210.05643) and
:class:`TensorFormulation` (any module on tensors; used to check the solvers on a
linear model, where eNTK regression is ordinary ridge regression). Each is passed to
:func:`stepstone.selection.entk.compute_kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from stepstone.esm.encoder import Encoder, pad_batch
from stepstone.esm.taskmodel import TaskModel
from stepstone.selection.entk import Formulation, KernelError


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
    """f(x) = head(pool(encoder(x))): a :class:`~stepstone.esm.taskmodel.TaskModel`'s logits.

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
