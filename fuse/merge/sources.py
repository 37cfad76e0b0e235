"""Open the merge inputs named by a recipe: the base LLM and the members (headers only).

Members are read with :func:`fuse.members.load_member`; their vision branch is
dropped right away (``keep_vision=False``) so only LLM headers, tokenizer facts and
config stay in memory. Every error is re-raised naming the recipe field.

``models`` (``{recipe value: fuse.hub.ModelFiles}``, from :func:`fuse.hub.resolve_recipe`) says
where each model's files are; a headers-only view (hub model whose weights are not downloaded)
opens as a :meth:`~fuse.checkpoint.LazyCheckpoint.from_headers` checkpoint. Without ``models``,
recipe values are local directories or complete snapshots in the hub cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import LazyCheckpoint, read_json
from ..errors import FuseError
from ..hub import ModelFiles
from ..members import LLMPart, Member, detect_format, load_member, resolve_path
from ..members.base import llm_config_from
from ..members.common import tokenizer_dir
from ..recipe import MemberSpec, Recipe

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class MemberInput:
    """One opened member (vision branch already released unless asked to keep it)."""

    index: int
    name: str
    spec: MemberSpec
    member: Member
    weight: float
    vision_bytes: int = 0        # peak bytes in memory while its branch is written to OUT
    vision_save_bytes: int = 0   # the branch as saved (its stored non-LLM tensors)

    @property
    def llm(self) -> LLMPart:
        return self.member.llm

    @property
    def format(self) -> str:
        return self.member.format

    @property
    def path(self) -> Path:
        return self.member.path

    @property
    def field(self) -> str:
        return f"members[{self.index}]"


@dataclass
class BaseInput:
    """The shared pretrained LLM (a plain ``LlamaForCausalLM`` dir, or the LLM of an MLLM checkpoint)."""

    source: str
    path: Path
    llm: LLMPart
    architecture: str
    tokenizer_path: str | None
    extra: dict = field(default_factory=dict)


Models = dict[str, ModelFiles]


def _reraise(recipe: Recipe, where: str, e: FuseError) -> FuseError:
    return type(e)(f"{recipe.label}: {where}: {e}")


def model_files(source: str, models: Models | None) -> tuple[Path, LazyCheckpoint | None]:
    """(directory, headers-only checkpoint or None) of a recipe model."""
    files = models.get(source) if models else None
    if files is None:
        return resolve_path(source), None
    return files.path, (LazyCheckpoint.from_headers(files.path, files.headers) if files.headers is not None else None)


def open_base(recipe: Recipe, models: Models | None = None) -> BaseInput | None:
    if not recipe.base_model:
        return None
    try:
        path, headers_only = model_files(recipe.base_model, models)
        if not path.is_dir():
            raise FuseError(f"{path}: the base model must be a checkpoint directory")
        config = read_json(path / "config.json", "config.json (is this a model directory?)")
        reader = headers_only or LazyCheckpoint(path)
        archs = config.get("architectures") or []
        if config.get("model_type") == "llama" or any(a in LLAMA_ARCHITECTURES for a in archs):
            keys = {k: k for k in reader.keys() if k.startswith(("model.", "lm_head."))}
            llm = LLMPart(config=llm_config_from(config, path / "config.json"), keys=keys, reader=reader)
            return BaseInput(recipe.base_model, path, llm, "LlamaForCausalLM", tokenizer_dir(path))
        try:
            detect_format(config, reader.keys(), path)
        except FuseError:  # not an MLLM we know: report its architecture in the family check
            arch = (archs or [config.get("model_type", "?")])[0]
            keys = {k: k for k in reader.keys() if k.startswith(("model.", "lm_head."))}
            llm = LLMPart(config=dict(config), keys=keys, reader=reader)
            return BaseInput(recipe.base_model, path, llm, str(arch), tokenizer_dir(path))
        m = load_member(path, vision=False, reader=reader)
        return BaseInput(recipe.base_model, path, m.llm, "LlamaForCausalLM", m.text.tokenizer_path)
    except FuseError as e:
        raise _reraise(recipe, "base_model", e) from None


def vision_nbytes(member: Member) -> int:
    """Bytes of a built vision branch in memory (0 when not built)."""
    if member.vision is None:
        return 0
    return sum(t.numel() * t.element_size() for t in member.vision.state_dict().values())


def stored_vision_bytes(member: Member) -> tuple[int, int]:
    """(total, largest tensor) bytes of the checkpoint's non-LLM tensors (header facts only)."""
    reader = member.llm.reader
    sizes = [reader.info(k).nbytes for k, part in member.key_usage.items() if part != "llm" and k in reader]
    return sum(sizes), max(sizes, default=0)


def copies_vision(member: Member) -> bool:
    """Whether ``fuse merge`` copies this member's branch byte for byte (see ``FormatAdapter.copyable_vision``)."""
    from ..members import FORMATS

    return FORMATS[member.format].copyable_vision(member)


def open_member(recipe: Recipe, index: int, keep_vision: bool = False,
                dtype: torch.dtype | str | None = "source", models: Models | None = None) -> MemberInput:
    """Open member ``index``. Without ``keep_vision`` only headers, configs and the text side
    are read (no module is built); with it, the vision branch is built in the checkpoint's own
    dtype (it is only saved to OUT, never run), so an 8B bf16 member never holds a float32 copy."""
    spec = recipe.members[index]
    name = recipe.member_names()[index]
    try:
        path, headers_only = model_files(spec.model, models)
        m = load_member(path, format=spec.format, dtype=dtype, name=name, vision=keep_vision, reader=headers_only,
                        **spec.options)
    except FuseError as e:
        raise _reraise(recipe, f"members[{index}].model", e) from None
    except TypeError as e:  # unknown adapter option
        raise _reraise(recipe, f"members[{index}].options", FuseError(str(e))) from None
    total, largest = stored_vision_bytes(m)
    in_memory = vision_nbytes(m) if keep_vision else (largest if copies_vision(m) else total)
    return MemberInput(index, name, spec, m, recipe.weights()[index], in_memory, total)


def open_members(recipe: Recipe, keep_vision: bool = False, models: Models | None = None) -> list[MemberInput]:
    return [open_member(recipe, i, keep_vision, models=models) for i in range(len(recipe.members))]


__all__ = ["BaseInput", "MemberInput", "Models", "copies_vision", "model_files", "open_base", "open_member",
           "open_members", "stored_vision_bytes", "vision_nbytes"]
