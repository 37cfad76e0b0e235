"""The trainable model: fusion module + any Hugging Face causal LM.

:class:`CommModel` is what ``accelerate`` wraps (DDP / FSDP / DeepSpeed). The frozen
encoders stay outside it: the loop runs :meth:`CommBranch.encode` (no grad) and passes
the features in, so the wrapped module holds only trainable-or-LLM weights.

``forward``: token embeddings of ``input_ids``; the ``image_mask`` slots (``N_vis`` per image
sample, in row order) are overwritten with ``fusion(feats)`` ``[B_img, N_vis, D]``; then the
LLM on ``inputs_embeds`` with transformers' own causal-LM loss (labels are -100 on
prompt and image positions; ``num_items_in_batch`` sets the normaliser, see the loop).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuse.checkpoint import LazyCheckpoint, read_json
from fuse.errors import CheckpointError, RecipeError
from fuse.members.comm import CommBranch, load_comm_branch
from fuse.fusions import Fusion


class CommModel(nn.Module):
    """``fusion`` (visual tokens) + ``llm`` (``AutoModelForCausalLM``).

    Parameter names start with ``fusion.`` or ``llm.``: the trainable groups of the presets.
    """

    def __init__(self, fusion: Fusion, llm: nn.Module):
        super().__init__()
        self.fusion = fusion
        self.llm = llm

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
              feats: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Input embeddings ``[B, T, D]`` with visual tokens in the image slots."""
        emb = self.llm.get_input_embeddings()(input_ids)
        if feats is None:
            if bool(image_mask.any()):
                raise ValueError("image slots in the batch but no image features")
            # keep every fusion parameter in the graph (DDP expects a gradient for each)
            zero = sum(p.sum() for p in self.fusion.parameters() if p.requires_grad) * 0.0
            return emb + zero.to(emb.dtype) if torch.is_tensor(zero) else emb
        vis = self.fusion(feats)  # [B_img, N, D]
        n_slots = int(image_mask.sum())
        if n_slots != vis.shape[0] * vis.shape[1]:
            raise ValueError(f"{n_slots} image slots but {vis.shape[0]} images x {vis.shape[1]} visual tokens")
        return emb.masked_scatter(image_mask.unsqueeze(-1), vis.to(emb.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                labels: torch.Tensor | None = None, feats: dict[str, torch.Tensor] | None = None,
                num_items_in_batch: torch.Tensor | None = None) -> Any:
        """Returns the LLM output; ``.loss`` = sum of token losses / ``num_items_in_batch`` (mean if None)."""
        emb = self.embed(input_ids, image_mask, feats)
        kw = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
        return self.llm(inputs_embeds=emb, attention_mask=attention_mask, labels=labels, use_cache=False, **kw)


def set_trainable(model: CommModel, groups: list[str]) -> list[str]:
    """Freeze everything except the named groups; returns the trainable parameter names."""
    from .fusion import trainable_prefixes

    prefixes = trainable_prefixes(groups)
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
        if p.requires_grad:
            names.append(n)
    if not names:
        raise RecipeError(f"trainable {groups}: no parameters to train")
    return names


def load_llm(source: str | os.PathLike, dtype: torch.dtype = torch.float32, text_config: dict | None = None):
    """``AutoModelForCausalLM`` from a dir / hub id (or from a comm member dir with ``text_config``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if text_config is not None:
            cfg = AutoConfig.for_model(**{k: v for k, v in text_config.items() if k not in ("transformers_version",)})
            return AutoModelForCausalLM.from_pretrained(str(source), config=cfg, dtype=dtype,
                                                        use_safetensors=True)
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot load the LLM ({str(e).splitlines()[0]})") from None


def read_previous_stage(path: str | os.PathLike) -> tuple[dict, CommBranch]:
    """(config.json, trained branch) of a finished stage (a ``comm`` member dir) for ``--from``."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: --from needs the previous stage's output directory (its final/ member dir)")
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"
    config = read_json(p / "config.json", "config.json of the previous stage")
    if config.get("model_type") != "comm":
        raise CheckpointError(f"{p / 'config.json'}: not a COMM model written by `train comm` "
                              f"(model_type {config.get('model_type')!r})")
    branch, _, _ = load_comm_branch(p, config, LazyCheckpoint(p))
    return {**config, "_dir": str(p)}, branch


__all__ = ["CommModel", "load_llm", "read_previous_stage", "set_trainable"]
