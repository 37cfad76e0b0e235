"""``FusedModel``: the merged LLM + every member's vision branch, answering about images.

For each (image, prompt) pair:

1. the prompt goes through the text member's prompt style (chat template) and is split on the
   single ``<image>`` placeholder into ``ids_before`` / ``ids_after`` (:class:`~fuse.members.TextSide`);
2. every member's branch preprocesses the image with its own transform and produces its visual
   tokens ``[N_m, D]`` (batched over the images; branches with ``needs_text`` get ``text_embeds``:
   per image the embeddings ``[T, D]`` of every prompt token except the placeholder, from the merged
   LLM's table, like SliME's ``get_pure_text_embedding``);
3. each member's tokens go through its token budget (:mod:`fuse.model.budget`) (steps 2-3:
   :func:`~fuse.model.encoding.encode_images`);
4. the sequence ``[text before][member 1][sep?][member 2]...[text after]`` is assembled with
   position ids from each member's position scheme (:mod:`fuse.model.positions`), left-padded
   (:func:`~fuse.model.assembly.assemble_inputs`);
5. the merged LLM runs on ``inputs_embeds`` (``forward`` -> logits, ``generate`` -> text, stopping
   on every member's eos ids (:mod:`fuse.model.generation`); transformers' ``generate`` keeps custom
   position ids growing from the last prompt position);
6. optionally (``inference.answer_select``) steps 4-5 run once per member subset and each sample keeps the
   greedy answer of highest score: its log-probability, or (``pmi``) that minus its log-probability given
   a content-free image (:meth:`FusedModel.generate`).

Build one with :meth:`FusedModel.from_pretrained` (a ``fuse merge`` output directory) or
:meth:`FusedModel.from_members` (loaded :class:`~fuse.members.Member` objects + an LLM; a single
member with no LLM uses its own LLM and reproduces the original model).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessorList, PreTrainedModel

from ..errors import CheckpointError, DataError, FuseError
from ..fused_layout import LLM_DIR, fused_eos_ids, member_entry
from ..images import load_image
from ..members import TextSide, VisionBranch
from ..names import NAME_RX, unique_names
from .assembly import Assembled, assemble_inputs
from .attention import AttentionCapture, capture, decoder_layers, last_position_attention, llm_layer_indices
from .budget import BudgetResult, select_total
from .config import FusedConfig
from .encoding import encode_images
from .generation import (FiniteLogits, GenerationResult, answer_log_probs, check_generation, eligible_candidates,
                         continuation_log_probs, cut_at_eos, generation_config, with_stop)
from .loading import (HUB_KWARGS, fused_text_side, load_branches, load_llm, member_dirs, read_fused_config,
                      save_fused_model)
from .options import InferenceOptions, answer_candidates, refuse_inference_keywords


@dataclass
class FusedInputs:
    """A prepared, left-padded batch plus what was done to build it.

    ``inputs_embeds [B, L, D]``, ``attention_mask [B, L]``, ``position_ids [B, L]``;
    ``spans[b]``: segment name -> (start, end) in padded coordinates; ``tokens[b]``: member ->
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


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


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
            llm = load_llm(Path(llm), dtype)
        idx = names.index(text_member) if isinstance(text_member, str) else int(text_member)
        if not 0 <= idx < len(members):
            raise FuseError(f"text_member: {text_member!r} is not one of the members {names}")
        text = members[idx].text
        eos = fused_eos_ids([m.text.eos_token_ids for m in members], idx)
        infos = [member_entry(n, m, str(m.path), None) for n, m in zip(names, members)]
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
        ignored = sorted(k for k, v in kwargs.items() if k not in HUB_KWARGS and v is not None)
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
            config = read_fused_config(root)
        dirs = member_dirs(root, config)  # every file checked before anything big is loaded
        llm = load_llm(root / LLM_DIR, dtype, attn_implementation)
        branches, texts = load_branches(config, dirs, dtype)
        text = fused_text_side(root, config, texts)
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
        save_fused_model(self, save_directory, force=force)

    # ------------------------------------------------------------------ inputs
    def _text_side(self, template: bool) -> TextSide:
        if template:
            return self.text
        if self._raw_text is None:
            self._raw_text = dataclasses.replace(self.text, prompt_style="plain", _tokenizer=self.text.tokenizer)
        return self._raw_text

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """Token ids -> the merged LLM's input embeddings ``[n, D]`` (DataError for an id outside the table)."""
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
                inference: Mapping[str, Any] | None = None, max_new_tokens: int = 0,
                members: Sequence[str] | None = None) -> FusedInputs:
        """Images + prompts -> the assembled, left-padded LLM input.

        ``images``: one per prompt (paths or PIL images; converted to RGB by ``fuse.images.load_image``).
        ``template``: apply the text member's prompt style (chat template) to each prompt; False uses
        the prompt as the full text. ``inference``: overrides of the model's inference options for this
        call, as in the recipe's ``inference`` section (``{"token_budget": "pool:2", "positions": {name:
        "share"}, "separator": "member"}``, see :mod:`fuse.model.options`). ``max_new_tokens`` is only
        used to check the context length. ``members``: only these members' visual tokens (recipe order
        kept; default every member), as ``answer_select`` uses them.
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
        names = self._member_subset(members)
        pil = [load_image(im) for im in images]
        side = self._text_side(template)
        full = [side.prompt(p) for p in prompts]
        text_ids = [side.encode(f) for f in full]
        # text-aware branches (SliME) get every prompt token but the placeholder, as SliME's own
        # get_pure_text_embedding; the topk budget scores against the user's question tokens only
        p_embeds: list[torch.Tensor | None] = [None] * len(prompts)
        q_embeds: list[torch.Tensor | None] = [None] * len(prompts)
        if any(self.branches[n].needs_text for n in names):
            p_embeds = [self.embed_ids(b + a) for b, a in text_ids]
        if any(spec.kind == "topk" for spec in opts.budget.values()):
            q_embeds = [self.embed_ids(self._question_ids(p, b, a)) for p, (b, a) in zip(prompts, text_ids)]
        t_text = time.perf_counter() - t_start

        weight = self.llm.get_input_embeddings().weight
        enc = encode_images({n: self.branches[n] for n in names}, pil, opts.budget, p_embeds, q_embeds,
                            weight.dtype, weight.device)
        t1 = time.perf_counter()
        separators = [self._separator_id(opts, names, j) for j in range(len(names))]
        visual = {n: enc.budgeted[n] for n in names}
        parallel = opts.member_positions == "parallel"
        assembled = assemble_inputs(text_ids, self.embed_ids, visual, opts.positions, separators, parallel=parallel)
        t_select = 0.0
        if opts.total is not None and any(sum(visual[n][i].count for n in visual) > opts.total.tokens
                                          for i in range(len(prompts))):
            t_sel = time.perf_counter()
            assembled = self._keep_total(opts, visual, assembled, text_ids, separators)
            t_select = time.perf_counter() - t_sel
        self._check_context(assembled, visual, text_ids, max_new_tokens)
        t_asm = time.perf_counter() - t1 + t_text - t_select
        per_sample = range(len(prompts))
        return FusedInputs(
            assembled=assembled,
            tokens=[{n: visual[n][i].count for n in visual} for i in per_sample],
            raw_tokens=[{n: enc.raw_counts[n][i] for n in visual} for i in per_sample],
            grids=[{n: visual[n][i].grids for n in visual} for i in per_sample],
            raw_grids=[{n: enc.raw_grids[n][i] for n in visual} for i in per_sample],
            kept=[{n: visual[n][i].kept for n in visual} for i in per_sample],
            text_ids=text_ids,
            timings={"vision": enc.seconds, "assembly": t_asm, "select": t_select})

    def _keep_total(self, opts: InferenceOptions, visual: dict[str, list[BudgetResult]], assembled: Assembled,
                    text_ids: list[tuple[list[int], list[int]]], separators: list[int | None]) -> Assembled:
        """Apply ``opts.total``: score every visual token by the last prompt position's attention in
        layer ``opts.total.layer`` of the full sequence, keep the best ``opts.total.tokens`` over all
        members (:func:`~fuse.model.budget.select_total`), re-assemble. ``visual`` is updated in place
        (kept tokens; ``kept``: indices into the member's original tokens; no grid)."""
        attn = last_position_attention(self.llm, assembled.inputs_embeds, assembled.attention_mask,
                                       assembled.position_ids, opts.total.layer)  # [B, L]
        keeps = []
        for i in range(len(text_ids)):
            spans = assembled.spans[i]
            scores = [attn[i, spans[n][0]:spans[n][1]] for n in visual]
            keeps.append(dict(zip(visual, select_total(scores, opts.total.tokens))))
        out = assemble_inputs(text_ids, self.embed_ids, visual, opts.positions, separators, kept=keeps,
                              parallel=opts.member_positions == "parallel")
        for i, keep in enumerate(keeps):
            for name, idx in keep.items():
                res = visual[name][i]
                base = res.kept if res.kept is not None else torch.arange(res.count)
                visual[name][i] = BudgetResult(res.tokens[idx], None, base[idx])
        return out

    def _member_subset(self, members: Sequence[str] | None) -> list[str]:
        """``members`` in recipe order (None: every member); an unknown name is an error."""
        if members is None:
            return list(self.member_names)
        unknown = [n for n in members if n not in self.member_names]
        if unknown or not members:
            raise FuseError(f"members={list(members)!r}: expected a non-empty subset of {self.member_names}")
        return [n for n in self.member_names if n in members]

    def _separator_id(self, opts: InferenceOptions, names: Sequence[str], j: int) -> int | None:
        """Token id to insert after ``names[j]`` (never after the last member of ``names``)."""
        if j == len(names) - 1 or opts.separator == "none":
            return None
        if opts.separator == "member":
            sep = self.config.members[self.member_names.index(names[j])].get("separator_token_id")
            return int(sep) if sep is not None else None
        return int(opts.separator)

    def _check_context(self, asm: Assembled, per_member: dict[str, list[BudgetResult]],
                       text_ids: list[tuple[list[int], list[int]]], max_new_tokens: int) -> None:
        ctx = self.context_length
        if not ctx:
            return
        for i, n_pos in enumerate(asm.n_positions):
            if n_pos + max_new_tokens > ctx:
                vis = {n: per_member[n][i].count for n in per_member}
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
        refuse_inference_keywords(llm_kwargs)
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

        With ``answer_select: confidence`` (inference option) the merged LLM answers greedily once per
        member subset of :func:`~fuse.model.options.answer_candidates` (every member together, then each
        member alone) and each sample keeps the answer of highest log-probability (sum over the answer's
        tokens and its eos): a member whose tokens carry the evidence answers confidently, one that cannot
        see the property asked about does not. It costs one generation per subset.

        ``answer_select: pmi`` scores each subset's answer by how much the image itself raised it:
        ``log p(a | subset's tokens of the image) - log p(a | subset's tokens of a flat null_image)``, the
        pointwise mutual information of answer and image under that subset. A member blind to what is asked
        answers from the question alone, as confidently on the blank image, and scores near 0; its
        confidence is no longer mistaken for evidence (the content-free calibration of Zhao et al. 2021,
        "Calibrate Before Use", Sec. 4, with an image as the content-free input). It costs one more forward
        pass per subset.

        ``abstain: unseen_words`` (with either) leaves out, per question, every subset holding a member whose
        recorded training questions (``question_words`` in ``fuse_config.json``) lack one of its words
        (:func:`~fuse.model.generation.eligible_candidates`); members that record none never abstain.
        """
        refuse_inference_keywords(gen_kwargs)
        check_generation(max_new_tokens, do_sample, temperature, top_p, seed)
        t0 = time.perf_counter()
        single = isinstance(prompts, str)
        opts = self.options.override(self.member_names, inference)
        candidates = answer_candidates(opts.answer_select, self.member_names)
        if len(candidates) > 1 and do_sample:
            raise FuseError(f"answer_select {opts.answer_select!r} compares greedy answers; it cannot be combined "
                            "with do_sample=True (pass inference={'answer_select': 'none'} to sample)")
        eos = self.eos_token_ids
        config = generation_config(self.text.tokenizer, eos, max_new_tokens, do_sample, temperature, top_p,
                                   **gen_kwargs)
        if len(candidates) > 1:
            config.output_scores, config.return_dict_in_generate = True, True
        if seed is not None:
            torch.manual_seed(seed)
        if len(candidates) > 1:  # read each image file once, not once per candidate
            images = [load_image(im) for im in _as_list(images)]
        pmi = opts.answer_select.partition(":")[0] == "pmi"
        if pmi:  # one flat null image per sample, of that sample's size (branches that tile by size tile it alike)
            blank = [Image.new("RGB", im.size, opts.null_image) for im in images]
        plist = _as_list(prompts)
        n = len(plist)
        eligible = [[True] * n for _ in candidates]
        if opts.abstain == "unseen_words" and len(candidates) > 1:
            eligible = eligible_candidates(candidates, {m["name"]: m.get("question_words") for m in self.config.members},
                                           plist, self.text.placeholder)
        best = [float("-inf")] * n  # per sample: highest answer score so far
        # per sample: the candidate that gave it (ties keep the earlier one); the first eligible one to start
        choice = [next(c for c in range(len(candidates)) if eligible[c][i]) for i in range(n)]
        answers: list[dict[int, tuple[list[int], dict[str, int], int]]] = []  # per candidate: sample -> its answer
        read = [0] * n  # per sample: visual tokens the LLM read over every pass run for it
        t_gen, timings = 0.0, {}
        for c, members in enumerate(candidates):
            idx = [i for i in range(n) if eligible[c][i]]  # a candidate runs only on the samples it may answer
            answers.append({})
            if not idx:
                continue
            sub_images, sub_prompts = ((images, prompts) if len(idx) == n
                                       else ([images[i] for i in idx], [plist[i] for i in idx]))
            inputs = self.prepare(sub_images, sub_prompts, template, inference, max_new_tokens, members=members)
            t1 = time.perf_counter()
            out = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                    position_ids=inputs.position_ids, generation_config=config,
                                    logits_processor=LogitsProcessorList([FiniteLogits(self.llm.dtype)]))
            t_gen += time.perf_counter() - t1
            rows = out.sequences if len(candidates) > 1 else out
            ids = [cut_at_eos(row.tolist(), eos) for row in rows]
            for k, v in inputs.timings.items():
                timings[k] = _add_timing(timings.get(k), v)
            scores = [0.0] * len(idx)
            if len(candidates) > 1:
                scores = answer_log_probs(self.llm, out, ids)
                if pmi:
                    null = self.prepare([blank[i] for i in idx], sub_prompts, template, inference, max_new_tokens,
                                        members=members)
                    given_null = continuation_log_probs(self.llm, null.inputs_embeds, null.attention_mask,
                                                        null.position_ids,
                                                        [with_stop(r.tolist(), a) for r, a in zip(rows, ids)])
                    scores = [v - g for v, g in zip(scores, given_null)]
            for j, i in enumerate(idx):
                answers[c][i] = (ids[j], inputs.tokens[j], inputs.assembled.lengths[j])
                read[i] += sum(inputs.tokens[j].values())
                if scores[j] > best[i]:
                    best[i], choice[i] = scores[j], c
        kept = [answers[c][i] for i, c in enumerate(choice)]
        texts = [self.decode(a[0]) for a in kept]
        if not return_details:
            return texts[0] if single else texts
        timings = {**timings, "generate": t_gen, "total": time.perf_counter() - t0}
        return GenerationResult(texts, [a[0] for a in kept], [a[1] for a in kept], [a[2] for a in kept], timings,
                                selected=[list(candidates[c]) for c in choice] if len(candidates) > 1 else None,
                                visual_tokens_read=read)

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
        inputs = self.prepare(images, prompts, template, inference, max_new_tokens)
        layer_ids = llm_layer_indices(layers, len(decoder_layers(self.llm)))
        answers: list[list[int]] = [[] for _ in inputs.assembled.lengths]
        if query == "answer":
            out = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                    position_ids=inputs.position_ids,
                                    generation_config=generation_config(self.text.tokenizer, self.eos_token_ids,
                                                                        max_new_tokens))
            answers = [cut_at_eos(r.tolist(), self.eos_token_ids) for r in out]
        return capture(self, inputs, layer_ids, query, answers)


def _add_timing(a: Any, b: Any) -> Any:
    """Sum two timing entries (seconds, or member -> seconds) over the generations of ``answer_select``."""
    if a is None:
        return b
    if isinstance(b, dict):
        return {k: a.get(k, 0.0) + v for k, v in b.items()} | {k: v for k, v in a.items() if k not in b}
    return a + b


def load(path: str | os.PathLike, **kwargs: Any) -> FusedModel:
    """``fuse.load(OUT)``: shorthand for :meth:`FusedModel.from_pretrained`."""
    return FusedModel.from_pretrained(path, **kwargs)


__all__ = ["FusedModel", "FusedInputs", "GenerationResult", "check_generation", "load"]
