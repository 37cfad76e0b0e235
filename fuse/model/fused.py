"""``FusedModel``: the merged LLM + every member's vision branch, answering about images.

For each (image, prompt) pair:

1. the prompt goes through the text member's prompt style (chat template) and is split on the
   single ``<image>`` placeholder into ``ids_before`` / ``ids_after`` (:class:`~fuse.members.TextSide`);
2. every member's branch preprocesses the image with its own transform and produces its visual
   tokens ``[N_m, D]`` (batched over the images; branches with ``needs_text`` get ``text_embeds``:
   per image the embeddings ``[T, D]`` of every prompt token except the placeholder, from the merged
   LLM's table, like SliME's ``get_pure_text_embedding``);
3. each member's tokens go through its token budget (:mod:`fuse.model.budget`);
4. the sequence ``[text before][member 1][sep?][member 2]...[text after]`` is assembled with
   position ids from each member's position scheme (:mod:`fuse.model.positions`), left-padded
   (:mod:`fuse.model.assembly`);
5. the merged LLM runs on ``inputs_embeds`` (``forward`` -> logits, ``generate`` -> text, stopping
   on every member's eos ids; transformers' ``generate`` keeps custom position ids growing from
   the last prompt position).

Build one with :meth:`FusedModel.from_pretrained` (a ``fuse merge`` output directory) or
:meth:`FusedModel.from_members` (loaded :class:`~fuse.members.Member` objects + an LLM; a single
member with no LLM uses its own LLM and reproduces the original model).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, PreTrainedModel

from ..checkpoint import LazyCheckpoint, read_json
from ..errors import CheckpointError, DataError, FuseError, NumericsError
from ..fused_layout import (FUSE_CONFIG, LLM_DIR, MODEL_CARD, VISION_CONFIG, VISION_WEIGHTS, fused_eos_ids,
                            has_tokenizer, member_dir, model_card)
from ..images import load_image
from ..members import TextSide, VisionBranch, load_vision_branch, save_vision_branch
from ..names import NAME_RX, unique_names
from ..output_dir import atomic_output_dir
from .assembly import Assembled, Piece, assemble
from .attention import AttentionCapture, SampleAttention, record_attention, resolve_layers
from .budget import BudgetResult, apply_budget
from .config import FusedConfig
from .options import INFERENCE_KEYS, InferenceOptions
from .positions import span_offsets

# what AutoModel.from_pretrained passes along for hub downloads (a fused dir is always local)
_HUB_KWARGS = {"cache_dir", "force_download", "proxies", "revision", "token", "local_files_only", "subfolder",
               "trust_remote_code", "code_revision", "_commit_hash", "adapter_kwargs", "_from_auto", "device_map"}


@dataclass
class FusedInputs:
    """A prepared, left-padded batch plus what was done to build it.

    ``inputs_embeds [B, L, D]``, ``attention_mask [B, L]``, ``position_ids [B, L]``;
    ``spans[b]``: piece name -> (start, end) in padded coordinates; ``tokens[b]``: member ->
    visual-token count after the budget (``raw_tokens``: before); ``grids``/``kept``: per sample,
    member -> layout of the kept tokens / kept indices (see :class:`~fuse.model.budget.BudgetResult`);
    ``timings``: seconds, ``vision`` per member and ``assembly``.
    """

    assembled: Assembled
    tokens: list[dict[str, int]]
    raw_tokens: list[dict[str, int]]
    grids: list[dict[str, list | None]]
    raw_grids: list[dict[str, list | None]]
    kept: list[dict[str, torch.Tensor | None]]
    text_ids: list[tuple[list[int], list[int]]]
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs_embeds(self) -> torch.Tensor:
        return self.assembled.inputs_embeds

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.assembled.attention_mask

    @property
    def position_ids(self) -> torch.Tensor:
        return self.assembled.position_ids

    @property
    def spans(self) -> list[dict[str, tuple[int, int]]]:
        return self.assembled.spans


@dataclass
class GenerationResult:
    """``texts`` (decoded answers), ``token_ids`` (answer ids, cut at the first eos),
    ``tokens`` (member -> visual tokens per sample), ``prompt_tokens`` (sequence length per sample),
    ``timings`` (seconds: ``vision`` per member, ``assembly``, ``generate``, ``total``)."""

    texts: list[str]
    token_ids: list[list[int]]
    tokens: list[dict[str, int]]
    prompt_tokens: list[int]
    timings: dict[str, Any]


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


class FusedModel(PreTrainedModel):
    """Merged LLM (``self.llm``, a causal LM) + vision branches (``self.branches``, recipe order).

    Main entry points: :meth:`generate` (answers), :meth:`forward` (logits),
    :meth:`prepare` (the assembled inputs), :meth:`capture_attention` (attention to each member's
    visual tokens), :meth:`save_pretrained` / :meth:`from_pretrained` (the ``fuse merge`` layout).
    """

    config_class = FusedConfig
    base_model_prefix = "fused"
    main_input_name = "inputs_embeds"

    def __init__(self, config: FusedConfig, llm: nn.Module | None = None,
                 branches: dict[str, VisionBranch] | None = None, text: TextSide | None = None,
                 member_texts: dict[str, TextSide] | None = None):
        super().__init__(config)
        if llm is None or not branches or text is None:
            raise FuseError("FusedModel needs an LLM, at least one vision branch and a text side; "
                            "use FusedModel.from_pretrained(dir) or FusedModel.from_members(members)")
        self.llm = llm
        self.branches = nn.ModuleDict(branches)
        self._names = list(self.branches.keys())
        self.text = text
        self.member_texts = dict(member_texts or {})
        self.options = InferenceOptions.parse(config.inference, self.member_names)
        self._raw_text: TextSide | None = None
        embed = self.llm.get_input_embeddings()
        for branch in self.branches.values():
            # hook for branches that splice LLM token embeddings in their own output (e.g. SliME's separator)
            if hasattr(branch, "bind_token_embeddings"):
                branch.bind_token_embeddings(lambda ids, _e=embed: _e(ids.to(_e.weight.device)))

    # ------------------------------------------------------------------ construction
    @property
    def member_names(self) -> list[str]:
        """Member names in visual-token order."""
        return list(self._names)

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(i) for i in (self.config.text.get("eos_token_ids") or self.text.eos_token_ids)]

    @property
    def context_length(self) -> int | None:
        return getattr(self.llm.config, "max_position_embeddings", None)

    @classmethod
    def from_members(cls, members: Sequence[Any], llm: nn.Module | str | os.PathLike | None = None,
                     inference: dict[str, Any] | None = None, text_member: int | str = 0,
                     dtype: torch.dtype | None = None) -> "FusedModel":
        """Build in memory from loaded :class:`~fuse.members.Member` objects (recipe order).

        ``llm``: a causal LM module, a directory ``AutoModelForCausalLM`` loads, or None with
        exactly one member (its own LLM: the fused model then equals the original member).
        ``text_member``: index or name of the member whose tokenizer/prompt style is used.
        """
        from ..dtypes import parse_dtype

        members = list(members)
        if not members:
            raise FuseError("from_members: no members given")
        dtype = parse_dtype(dtype)
        names = unique_names([m.name for m in members])
        for n in names:
            if not NAME_RX.fullmatch(n):  # each becomes members/<name>/ in save_pretrained
                raise FuseError(f"from_members: member name {n!r} is not a plain directory name "
                                "(letters, digits, . _ -)")
        if llm is None:
            if len(members) != 1:
                raise FuseError("from_members: several members need a merged LLM (llm=...); "
                                "only a single member can use its own LLM")
            llm = members[0].llm.load_model(dtype)
        elif not isinstance(llm, nn.Module):
            llm = _load_llm(Path(llm), dtype)
        idx = names.index(text_member) if isinstance(text_member, str) else int(text_member)
        if not 0 <= idx < len(members):
            raise FuseError(f"text_member: {text_member!r} is not one of the members {names}")
        text = members[idx].text
        eos = fused_eos_ids([m.text.eos_token_ids for m in members], idx)
        infos = [{"name": n, "dir": member_dir(n), "format": m.format, "source": str(m.path), "weight": None,
                  "density": None, "eos_token_ids": list(m.text.eos_token_ids), "vocab_rows": m.llm.vocab_rows,
                  "prompt_style": m.text.prompt_style, "separator_token_id": m.text.separator_token_id}
                 for n, m in zip(names, members)]
        config = FusedConfig(members=infos, text={"member": names[idx], "prompt_style": text.prompt_style,
                                                  "placeholder": text.placeholder, "eos_token_ids": eos},
                             inference=dict(inference or {}), merge={"method": None})
        branches = {n: m.vision for n, m in zip(names, members)}
        if dtype is not None:
            for b in branches.values():
                b.to(dtype)
        return cls(config, llm=llm, branches=branches, text=text,
                   member_texts={n: m.text for n, m in zip(names, members)}).eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: FusedConfig | None = None, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, attn_implementation: str | None = None,
                        **kwargs: Any) -> "FusedModel":
        """Load a fused model directory written by ``fuse merge`` (or :meth:`save_pretrained`).

        ``dtype``: of the LLM and branches (default: the LLM checkpoint's dtype; branches float32).
        Missing or corrupt files raise :class:`~fuse.errors.CheckpointError` naming the file.
        """
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        if device is None and isinstance(kwargs.get("device_map"), (str, torch.device)):
            device = kwargs.pop("device_map")
        ignored = sorted(k for k, v in kwargs.items() if k not in _HUB_KWARGS and v is not None)
        if ignored:
            warnings.warn(f"FusedModel.from_pretrained ignores {', '.join(ignored)}", stacklevel=2)
        from ..devices import resolve_device
        from ..dtypes import parse_dtype

        dtype = parse_dtype(dtype)
        device = resolve_device(device) if device is not None else None
        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such fused model directory (expected the output of `fuse merge`)")
        if config is None or not isinstance(config, FusedConfig):
            path = root / FUSE_CONFIG if (root / FUSE_CONFIG).is_file() or not (root / "config.json").is_file() \
                else root / "config.json"
            data = read_json(path, "fused model config (fuse_config.json)")
            if path.name != FUSE_CONFIG and data.get("model_type") != "visionfuse":
                arch = (data.get("architectures") or [data.get("model_type") or "unknown"])[0]
                raise CheckpointError(f"{root}: not a fused model (no {FUSE_CONFIG}; config.json describes a {arch}); "
                                      "`fuse merge` writes fused models; `fuse eval` and "
                                      "FusedModel.from_members([load_member(dir)]) take a single model")
            data = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
            config = FusedConfig(**data)
        where = root / FUSE_CONFIG
        if not config.members:
            raise CheckpointError(f"{where}: 'members' is empty")
        for i, m in enumerate(config.members):
            if not isinstance(m, dict) or not m.get("name"):
                raise CheckpointError(f"{where}: members[{i}] has no 'name'")
        member_dirs = [root / m.get("dir", member_dir(m["name"])) for m in config.members]
        for m, mdir in zip(config.members, member_dirs):
            if not os.path.realpath(mdir).startswith(os.path.realpath(root) + os.sep):
                raise CheckpointError(f"{where}: member {m['name']!r} dir {m.get('dir')!r} is outside {root}")
        for m, mdir in zip(config.members, member_dirs):  # check every file before loading anything big
            if not mdir.is_dir():
                raise CheckpointError(f"{mdir}: missing vision branch directory of member {m['name']!r}")
            for f in (VISION_CONFIG, VISION_WEIGHTS):
                if not (mdir / f).is_file():
                    raise CheckpointError(f"{mdir / f}: missing file of member {m['name']!r}")
        llm = _load_llm(root / LLM_DIR, dtype, attn_implementation)
        branches, texts = {}, {}
        for m, mdir in zip(config.members, member_dirs):
            branch, vcfg = load_vision_branch(mdir, dtype=dtype)
            branches[m["name"]] = branch
            if vcfg.get("text"):
                texts[m["name"]] = TextSide.from_dict(vcfg["text"])
        text = _fused_text_side(root, config, texts)
        text.tokenizer  # load now: errors surface at load time and the model no longer needs the files
        model = cls(config, llm=llm, branches=branches, text=text, member_texts=texts)
        model.name_or_path = str(root)
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, force: bool = True, **kwargs: Any) -> None:
        """Write the ``fuse merge`` layout (llm/, members/<name>/, fuse_config.json, config.json) atomically.

        A new or empty ``save_directory`` is written; an earlier fused model (or any output this toolkit
        wrote) there is replaced as a whole (``force=False`` refuses it). A directory holding anything
        else, or a file, is refused (CheckpointError) and left untouched: unlike transformers, which
        writes into the directory, a fused model is never mixed with other files."""
        import json

        with atomic_output_dir(save_directory, force=force) as tmp:
            self.llm.save_pretrained(str(tmp / LLM_DIR))
            self.text.tokenizer.save_pretrained(str(tmp / LLM_DIR))
            members = []
            for info in self.config.members:
                name = info["name"]
                d = member_dir(name)
                save_vision_branch(self.branches[name], tmp / d, text=self.member_texts.get(name),
                                   extra={"format": info.get("format"), "source": info.get("source")})
                members.append({**info, "dir": d})
            self.config.members = members
            (tmp / FUSE_CONFIG).write_text(json.dumps(self.config.fuse_dict(), indent=2, default=str))
            self.config.save_pretrained(str(tmp))  # config.json, with transformers' own fields
            (tmp / MODEL_CARD).write_text(model_card(self.config.fuse_dict()))

    # ------------------------------------------------------------------ inputs
    def _text_side(self, template: bool) -> TextSide:
        if template:
            return self.text
        if self._raw_text is None:
            self._raw_text = dataclasses.replace(self.text, prompt_style="plain", _tokenizer=self.text.tokenizer)
        return self._raw_text

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()
        rows = emb.weight.shape[0]
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise DataError(f"token id {bad[0]} is outside the LLM's embedding table ({rows} rows)")
        return emb(torch.tensor(list(ids), dtype=torch.long, device=emb.weight.device))

    def _question_ids(self, prompt: str, before: list[int], after: list[int]) -> list[int]:
        """Token ids of the user's question (placeholder removed, no template): what the ``topk``
        budget scores visual tokens against. Falls back to the whole prompt's text ids."""
        q = prompt.replace(self.text.placeholder, " ").strip()
        ids = self.text.tokenizer(q, add_special_tokens=False)["input_ids"] if q else []
        return ids or (before + after)

    @torch.no_grad()
    def prepare(self, images: Any, prompts: str | Sequence[str], template: bool = True,
                inference: Mapping[str, Any] | None = None, max_new_tokens: int = 0) -> FusedInputs:
        """Images + prompts -> the assembled, left-padded LLM input.

        ``images``: one per prompt (paths or PIL images; converted to RGB by ``fuse.images.load_image``).
        ``template``: apply the text member's prompt style (chat template) to each prompt; False uses
        the prompt as the full text. ``inference``: overrides of the model's inference options for this
        call, as in the recipe's ``inference`` section (``{"token_budget": "pool:2", "positions": {name:
        "share"}, "separator": "member"}``, see :mod:`fuse.model.options`). ``max_new_tokens`` is only
        used to check the context length.
        """
        t_start = time.perf_counter()
        images, prompts = _as_list(images), _as_list(prompts)
        if len(images) != len(prompts):
            raise DataError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
        if not prompts:
            raise DataError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise DataError(f"prompt {i}: expected a string, got {type(p).__name__}")
        opts = self.options.override(self.member_names, inference)
        pil = [load_image(im) for im in images]
        side = self._text_side(template)
        full = [side.prompt(p) for p in prompts]
        text_ids = [side.encode(f) for f in full]
        # text-aware branches (SliME) get every prompt token but the placeholder, as SliME's own
        # get_pure_text_embedding; the topk budget scores against the user's question tokens only
        p_embeds: list[torch.Tensor | None] = [None] * len(prompts)
        q_embeds: list[torch.Tensor | None] = [None] * len(prompts)
        if any(b.needs_text for b in self.branches.values()):
            p_embeds = [self._embed_ids(b + a) for b, a in text_ids]
        if any(spec.kind == "topk" for spec in opts.budget.values()):
            q_embeds = [self._embed_ids(self._question_ids(p, b, a)) for p, (b, a) in zip(prompts, text_ids)]
        t_text = time.perf_counter() - t_start

        vision_t: dict[str, float] = {}
        per_member: dict[str, list[BudgetResult]] = {}
        raw_counts: dict[str, list[int]] = {}
        raw_grids: dict[str, list] = {}
        llm_dtype = self.llm.get_input_embeddings().weight.dtype
        llm_device = self.llm.get_input_embeddings().weight.device
        for name, branch in self.branches.items():
            t0 = time.perf_counter()
            batch = _to_device(branch.preprocess(pil), branch.device, branch.dtype)
            text_embeds = [e.to(branch.device, branch.dtype) for e in p_embeds] if branch.needs_text else None
            toks = branch(batch, text_embeds=text_embeds)
            if not all(bool(torch.isfinite(t).all()) for t in toks):
                raise NumericsError(f"member {name!r}: its vision branch produced NaN/Inf visual tokens "
                                    f"(NaN/Inf in its weights, or overflow in {branch.dtype}); no answer is possible")
            grids = branch.token_grids(batch) or [None] * len(pil)
            vision_t[name] = time.perf_counter() - t0
            spec = opts.budget[name]
            raw_counts[name] = [int(t.shape[0]) for t in toks]
            raw_grids[name] = list(grids)
            per_member[name] = [apply_budget(t.to(llm_device, llm_dtype), spec, g, qe)
                                for t, g, qe in zip(toks, grids, q_embeds)]

        t1 = time.perf_counter()
        samples = []
        for i, (before, after) in enumerate(text_ids):
            text_emb = self._embed_ids(before + after)  # one lookup per sample
            pieces = [Piece("text_before", "text", text_emb[:len(before)])]
            for j, name in enumerate(self.member_names):
                res = per_member[name][i]
                pieces.append(Piece(name, "visual", res.tokens,
                                    span_offsets(res.count, opts.positions[name], res.grids)))
                sep = self._separator_id(opts, j)
                if sep is not None:
                    pieces.append(Piece(f"sep:{name}", "sep", self._embed_ids([sep])))
            pieces.append(Piece("text_after", "text", text_emb[len(before):]))
            samples.append(pieces)
        assembled = assemble(samples)
        self._check_context(assembled, per_member, text_ids, max_new_tokens)
        t_asm = time.perf_counter() - t1 + t_text
        return FusedInputs(
            assembled=assembled,
            tokens=[{n: per_member[n][i].count for n in self.member_names} for i in range(len(prompts))],
            raw_tokens=[{n: raw_counts[n][i] for n in self.member_names} for i in range(len(prompts))],
            grids=[{n: per_member[n][i].grids for n in self.member_names} for i in range(len(prompts))],
            raw_grids=[{n: raw_grids[n][i] for n in self.member_names} for i in range(len(prompts))],
            kept=[{n: per_member[n][i].kept for n in self.member_names} for i in range(len(prompts))],
            text_ids=text_ids,
            timings={"vision": vision_t, "assembly": t_asm})

    def _separator_id(self, opts: InferenceOptions, j: int) -> int | None:
        """Token id to insert after member ``j`` (never after the last member)."""
        if j == len(self.member_names) - 1 or opts.separator == "none":
            return None
        if opts.separator == "member":
            sep = self.config.members[j].get("separator_token_id")
            return int(sep) if sep is not None else None
        return int(opts.separator)

    def _check_context(self, asm: Assembled, per_member: dict[str, list[BudgetResult]],
                       text_ids: list[tuple[list[int], list[int]]], max_new_tokens: int) -> None:
        ctx = self.context_length
        if not ctx:
            return
        for i, n_pos in enumerate(asm.n_positions):
            if n_pos + max_new_tokens > ctx:
                vis = {n: per_member[n][i].count for n in self.member_names}
                n_text = len(text_ids[i][0]) + len(text_ids[i][1])
                raise DataError(
                    f"prompt {i} is too long for the LLM's context of {ctx} positions: {n_text} text tokens + "
                    f"{sum(vis.values())} visual tokens ({', '.join(f'{k}: {v}' for k, v in vis.items())}) use "
                    f"{n_pos} positions, plus max_new_tokens {max_new_tokens}; shorten the prompt or use a "
                    "token budget (pool/topk) or position sharing")

    # ------------------------------------------------------------------ running
    def forward(self, images: Any = None, prompts: Any = None, inputs: FusedInputs | None = None,
                template: bool = True, inference: Mapping[str, Any] | None = None, **llm_kwargs: Any):
        """One forward pass of the merged LLM; returns its output (``.logits [B, L, V]``) with
        ``.fused_inputs`` set to the :class:`FusedInputs` used (build them with :meth:`prepare`)."""
        _refuse_inference_keywords(llm_kwargs)
        if inputs is None:
            inputs = self.prepare(images, prompts, template, inference)
        out = self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids, **llm_kwargs)
        out.fused_inputs = inputs
        return out

    @torch.no_grad()
    def generate(self, images: Any, prompts: str | Sequence[str], max_new_tokens: int = 128,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 template: bool = True, inference: Mapping[str, Any] | None = None,
                 return_details: bool = False, seed: int | None = None, **gen_kwargs: Any):
        """Answer ``prompts`` (one image each). Returns ``list[str]``, or a :class:`GenerationResult`
        with ``return_details=True``.

        Batched with left padding; stops on every member's eos id (``fuse_config.text.eos_token_ids``);
        greedy by default, sampling with ``do_sample=True`` (``temperature``, ``top_p``, ``seed``).
        ``inference``: as for :meth:`prepare`. Extra ``gen_kwargs`` go to transformers' ``GenerationConfig``
        (e.g. ``repetition_penalty``).
        """
        from transformers import GenerationConfig, LogitsProcessorList

        _refuse_inference_keywords(gen_kwargs)
        check_generation(max_new_tokens, do_sample, temperature, top_p, seed)
        t0 = time.perf_counter()
        single = isinstance(prompts, str)
        inputs = self.prepare(images, prompts, template, inference, max_new_tokens)
        eos = self.eos_token_ids
        tok = self.text.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        cfg: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                               "eos_token_id": eos or None, "pad_token_id": pad}
        if do_sample:
            cfg.update(temperature=float(temperature), top_p=float(top_p), top_k=gen_kwargs.pop("top_k", 0))
        cfg.update(gen_kwargs)
        if seed is not None:
            torch.manual_seed(seed)
        t1 = time.perf_counter()
        out = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                position_ids=inputs.position_ids, generation_config=GenerationConfig(**cfg),
                                logits_processor=LogitsProcessorList([_FiniteLogits(self.llm.dtype)]))
        t_gen = time.perf_counter() - t1
        ids = [self._cut_at_eos(row.tolist()) for row in out]
        texts = [self.decode(r) for r in ids]
        if not return_details:
            return texts[0] if single else texts
        timings = {**inputs.timings, "generate": t_gen, "total": time.perf_counter() - t0}
        return GenerationResult(texts, ids, inputs.tokens, inputs.assembled.lengths, timings)

    def _cut_at_eos(self, ids: list[int]) -> list[int]:
        eos = set(self.eos_token_ids)
        for k, i in enumerate(ids):
            if i in eos:
                return ids[:k]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text; ids beyond the tokenizer (extra embedding rows) are dropped."""
        tok = self.text.tokenizer
        n = len(tok)
        return tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ analysis hook
    @torch.no_grad()
    def capture_attention(self, images: Any, prompts: str | Sequence[str], layers: int | Sequence[int] | None = None,
                          query: str | Sequence[int] = "last", max_new_tokens: int = 16, template: bool = True,
                          inference: Mapping[str, Any] | None = None) -> AttentionCapture:
        """Attention from chosen positions to each member's visual tokens, per requested layer.

        Args:
            images, prompts, template, inference: as for :meth:`generate` (one image per prompt).
            layers: LLM layer indices (negative from the end); None = every layer. Only these layers
                are hooked; other layers' attention is never stored.
            query: which positions attend (in each sample's own unpadded sequence):
                ``"last"`` - the last prompt position (the one that predicts the first answer token), Q=1;
                ``"answer"`` - greedy-generate up to ``max_new_tokens`` first, then every position that
                predicted an answer token (last prompt position + answer tokens but the final one);
                ``"text_after"`` - every text position after the image;
                a list of ints - those positions (negative from the end of the prompt).
        Returns:
            :class:`~fuse.model.attention.AttentionCapture` with ``layers``, ``members`` and per sample a
            :class:`~fuse.model.attention.SampleAttention` whose ``weights[layer][member]`` is
            ``[H, Q, N_member]`` (float32 probabilities; the sum over a member's tokens is the attention
            share it gets), with ``spans``, ``grids``/``kept`` (to place tokens on the member's grid)
            and ``query_positions``.

        The LLM runs with eager attention during the capture (switched back afterwards); samples are
        run one at a time, unpadded, after the vision branches ran batched.
        """
        from .attention import decoder_layers

        inputs = self.prepare(images, prompts, template, inference, max_new_tokens)
        layer_ids = resolve_layers(layers, len(decoder_layers(self.llm)))
        answers: list[list[int]] = [[] for _ in inputs.assembled.lengths]
        if query == "answer":
            out = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                    position_ids=inputs.position_ids,
                                    generation_config=self._greedy_config(max_new_tokens))
            answers = [self._cut_at_eos(r.tolist()) for r in out]
        asm = inputs.assembled
        samples = []
        for b, (n, pad) in enumerate(zip(asm.lengths, asm.pad)):
            emb = asm.inputs_embeds[b:b + 1, pad:]
            pos = asm.position_ids[b:b + 1, pad:]
            spans = {k: (s - pad, e - pad) for k, (s, e) in asm.spans[b].items()}
            q = self._query_positions(query, n, spans, len(answers[b]))
            if answers[b]:
                extra = self._embed_ids(answers[b]).unsqueeze(0).to(emb.dtype)
                emb = torch.cat([emb, extra], 1)
                pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(len(answers[b]), device=pos.device)], 1)
                spans["answer"] = (n, n + len(answers[b]))
            key_spans = {m: spans[m] for m in self.member_names}
            qt = torch.tensor(q, dtype=torch.long)
            with record_attention(self.llm, layer_ids, qt, key_spans) as store:
                self.llm(inputs_embeds=emb, position_ids=pos, use_cache=False)
            samples.append(SampleAttention(
                query_positions=q, spans=spans, grids=inputs.grids[b], kept=inputs.kept[b],
                raw_grids=inputs.raw_grids[b], weights={l: store[l] for l in layer_ids},
                answer=self.decode(answers[b]) if query == "answer" else None,
                answer_ids=answers[b] if query == "answer" else None))
        return AttentionCapture(layers=layer_ids, members=self.member_names, samples=samples)

    def _greedy_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        tok = self.text.tokenizer
        eos = self.eos_token_ids
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        return GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, eos_token_id=eos or None,
                                pad_token_id=pad)

    @staticmethod
    def _query_positions(query: Any, n: int, spans: dict[str, tuple[int, int]], n_answer: int) -> list[int]:
        if query == "last":
            return [n - 1]
        if query == "answer":
            return [n - 1] + list(range(n, n + max(n_answer - 1, 0)))
        if query == "text_after":
            s, e = spans["text_after"]
            if e <= s:
                raise FuseError("query 'text_after': this prompt has no text after the image")
            return list(range(s, e))
        if isinstance(query, str):
            raise FuseError(f"query {query!r}: expected 'last', 'answer', 'text_after' or a list of positions")
        out = []
        for p in query:
            i = int(p) + n if int(p) < 0 else int(p)
            if not 0 <= i < n:
                raise FuseError(f"query position {p} is outside the prompt of {n} tokens")
            out.append(i)
        return out


# ---------------------------------------------------------------------- helpers
class _FiniteLogits(LogitsProcessor):
    """A transformers logits processor that fails loudly on NaN/+Inf scores (or a row that is all
    -Inf), which greedy decoding would otherwise turn into an empty answer with exit code 0."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.step = dtype, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise NumericsError(f"the LLM produced NaN/Inf logits at generation step {self.step} for sample(s) "
                                f"{rows} (NaN/Inf in the weights, or overflow in {self.dtype}); no answer is possible")
        return scores


def _refuse_inference_keywords(kwargs: Mapping[str, Any]) -> None:
    """token_budget= / positions= / separator= used to be keywords of their own; passed that way now they
    would reach transformers' GenerationConfig (or the LLM) and be ignored silently."""
    old = [k for k in INFERENCE_KEYS if k in kwargs]
    if old:
        raise FuseError(f"{old[0]}=...: inference options are passed together, as inference={{{old[0]!r}: ...}}")


def check_generation(max_new_tokens: Any, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None) -> None:
    """One-line errors for generation settings transformers would reject with a traceback (or take
    silently): called by :meth:`FusedModel.generate` and by the CLIs before a model is loaded."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise FuseError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature):
            raise FuseError(f"temperature: sampling needs a temperature > 0, got {temperature!r} "
                            "(for greedy decoding, do not sample)")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise FuseError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64):
        raise FuseError(f"seed: expected an integer in [0, 2^64), got {seed!r}")


def _load_llm(llm_dir: Path, dtype: torch.dtype | None, attn_implementation: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from a directory, with one-line errors naming missing files."""
    from transformers import AutoModelForCausalLM

    if not llm_dir.is_dir():
        raise CheckpointError(f"{llm_dir}: missing merged LLM directory")
    read_json(llm_dir / "config.json", "LLM config.json")
    LazyCheckpoint(llm_dir)  # clear error on missing/truncated safetensors shards
    kw: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto", "use_safetensors": True}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(llm_dir), **kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{llm_dir}: cannot load the merged LLM ({str(e).splitlines()[0]})") from None
    return model.eval()


def _fused_text_side(root: Path, config: FusedConfig, member_texts: dict[str, TextSide]) -> TextSide:
    """The text member's TextSide, with the fused eos union and the tokenizer saved in ``llm/`` if any."""
    names = config.member_names
    tm = config.text.get("member") or names[0]
    if tm not in names:
        raise CheckpointError(f"{root / FUSE_CONFIG}: text.member {tm!r} is not one of the members {names}")
    base = member_texts.get(tm) or TextSide(tokenizer_path=None)
    llm_dir = root / LLM_DIR
    tok_path = str(llm_dir) if has_tokenizer(llm_dir) else base.tokenizer_path
    if tok_path is None:
        raise CheckpointError(f"{llm_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json) and "
                              f"member {tm!r} records none")
    eos = config.text.get("eos_token_ids")
    if eos is None:  # a config written without the union: every member's, the text member's first
        eos = fused_eos_ids([m.get("eos_token_ids") or [] for m in config.members], names.index(tm))
    return TextSide(tokenizer_path=tok_path, prompt_style=config.text.get("prompt_style") or base.prompt_style,
                    placeholder=config.text.get("placeholder") or base.placeholder,
                    eos_token_ids=[int(i) for i in (eos or base.eos_token_ids)],
                    separator_token_id=base.separator_token_id)


def load(path: str | os.PathLike, **kwargs: Any) -> FusedModel:
    """``fuse.load(OUT)``: shorthand for :meth:`FusedModel.from_pretrained`."""
    return FusedModel.from_pretrained(path, **kwargs)


__all__ = ["FusedModel", "FusedInputs", "GenerationResult", "check_generation", "load"]
