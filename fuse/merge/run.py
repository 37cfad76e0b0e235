"""``fuse merge``: recipe -> family check -> streaming LLM merge -> OUT (atomically).

Memory: one row chunk (element-wise methods) or one tensor (TIES/DARE with
density < 1) per input is resident at a time; output bytes go straight to
the shard files (:class:`~fuse.merge.writer.StreamingShardWriter`); member
vision branches are loaded one at a time, only to be saved.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..dtypes import dtype_name
from ..fused_layout import LLM_DIR, MEMBERS_DIR, MODEL_CARD, copy_tokenizer, model_card, write_configs
from ..output_dir import atomic_output_dir, check_output, refuse_overlap
from ..recipe import Recipe
from ..hub import resolve_recipe
from .checksums import BackgroundChecksums, start_checksums
from .family import FamilyReport, check_family
from .methods import MergeError, TensorMerger, all_finite
from .outputs import fuse_config, generation_config, llm_config, tokenizer_source, union_eos
from .options import MergeOptions
from .pipeline import InputLoader, Loaded, merge_pieces, merge_workers, plan_pieces
from .plan import MergePlan, TensorJob, build_plan
from .reader import RowReader
from .sources import BaseInput, MemberInput, Models, open_base, open_members
from .threads import torch_threads
from .validate import validate_recipe
from .vision import save_vision_branches
from .writer import StreamingShardWriter

Echo = Callable[[str], None]


@dataclass
class OpenedFamily:
    recipe: Recipe
    base: BaseInput | None
    members: list[MemberInput]
    report: FamilyReport


@dataclass
class MergeResult:
    out: Path | None
    plan: MergePlan
    report: FamilyReport
    seconds: float = 0.0


def open_family(recipe: Recipe, allow_foreign: bool = False, echo: Echo | None = None, raise_bad: bool = True,
                models: Models | None = None) -> OpenedFamily:
    """Open base + members (headers, configs, tokenizers) and run the family check.
    ``models``: where each recipe model's files are (:func:`fuse.hub.resolve_recipe`)."""
    base = open_base(recipe, models)
    members = open_members(recipe, keep_vision=False, models=models)
    report = check_family(base, members)
    if echo is not None:
        echo(report.table(allow_foreign))
    if raise_bad:
        report.raise_if_bad(recipe.label, allow_foreign)
    return OpenedFamily(recipe, base, members, report)


def _not_finite(recipe: Recipe, job: TensorJob, rows: tuple[int, int], inputs: Sequence[tuple[str, torch.Tensor]],
                out_dtype: torch.dtype) -> MergeError:
    bad = [label for label, t in inputs if t is not None and not all_finite(t)]
    cause = (f"input{'s' if len(bad) > 1 else ''} {', '.join(bad)} already contain{'' if len(bad) > 1 else 's'} "
             "NaN/Inf" if bad else
             f"the inputs are finite: values overflow the compute/output dtype ({dtype_name(out_dtype)})")
    return MergeError(f"{recipe.label}: merged tensor {job.name} (rows {rows[0]}:{rows[1]}) contains NaN/Inf; "
                      f"{cause}; nothing was written")


def merge_llm(recipe: Recipe, plan: MergePlan, base: BaseInput | None, members: Sequence[MemberInput],
              directory: Path, display_dir: Path | None = None, options: MergeOptions = MergeOptions()) -> int:
    """Merge every planned tensor into ``directory`` (streaming). Returns bytes written.

    ``options.threads``: torch intra-op threads during the merge. Default: 1 for row-chunked merges
    (cache-sized, memory-bound element-wise math gains nothing from more threads and loses a lot
    on a busy machine), torch's default for whole-tensor methods (TIES/DARE top-k, sampling).
    ``options.kernel``: ``auto`` (mergekit's formula replayed in reused buffers where
    :mod:`fuse.merge.kernels` has it, checked against mergekit) or ``mergekit`` (call it per piece).
    ``options.workers``: row-chunked merges of deterministic methods merge this many chunks at once,
    each on its own thread (default: :func:`~fuse.merge.pipeline.merge_workers`); otherwise one.
    """
    with torch_threads(options.threads or (1 if plan.chunked else torch.get_num_threads())):
        return _merge_llm(recipe, plan, base, members, directory, display_dir, options)


def _merge_llm(recipe: Recipe, plan: MergePlan, base: BaseInput | None, members: Sequence[MemberInput],
               directory: Path, display_dir: Path | None, options: MergeOptions) -> int:
    """Read -> mergekit -> finiteness check -> write, piece by piece (:mod:`fuse.merge.pipeline`).

    Row-chunked plans: worker threads read chunks into reusable buffers and merge them while a
    writer thread appends the results in plan order (``window`` results at most in flight).
    Whole-tensor plans, and methods that draw random numbers (the RNG stream must follow plan
    order, as in mergekit-yaml), use one worker in this thread; whole-tensor plans also write
    each tensor before the next is read (memory: one tensor's working set, as ever).
    """
    from tqdm import tqdm

    merger = TensorMerger(recipe.merge.method, [m.name for m in members], [m.weight for m in members],
                          [m.spec.density for m in members], recipe.merge.parameters, plan.compute_dtype,
                          with_base=plan.with_base, kernel=options.kernel)
    writer = StreamingShardWriter(directory, [(j.name, j.shape, j.out_dtype) for j in plan.jobs], plan.max_shard_bytes,
                                  display_dir=display_dir)
    parts = [m.llm for m in members] + ([base.llm] if plan.with_base else [])
    parallel = plan.chunked and not merger.info.random
    n_workers = max(1, options.workers or merge_workers()) if parallel else 1
    window = n_workers + 2 if plan.chunked else 1
    def merge(loaded: Loaded) -> torch.Tensor:
        job, rows, owner = loaded.piece.job, (loaded.piece.start, loaded.piece.stop), loaded.piece.owner
        if owner is not None:  # carried rows: written as stored (read in the output dtype)
            if not all_finite(loaded.carried):
                raise _not_finite(recipe, job, rows, [(members[owner].name, loaded.carried)], job.out_dtype)
            return loaded.carried
        out = merger(loaded.members, loaded.base, job.out_dtype, job.name)
        if not all_finite(out):
            raise _not_finite(recipe, job, rows, [(m.name, t) for m, t in zip(members, loaded.members)] +
                              [("base_model", loaded.base)], job.out_dtype)
        return out

    t0, read = time.perf_counter(), 0
    try:
        with RowReader() as reader, torch.random.fork_rng(devices=[]), torch.no_grad(), \
                tqdm(total=len(plan.jobs), unit="tensor", desc="merging LLM", disable=not options.progress,
                     dynamic_ncols=True, leave=True) as bar:
            torch.manual_seed(recipe.merge.seed)  # mergekit-yaml --random-seed seeds torch the same way

            def done(job: TensorJob) -> None:  # called by the writer thread
                nonlocal read
                read += job.read_bytes
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{read / dt / 1e9:.2f} GB/s read", refresh=False)
                bar.update(1)

            loaders = [InputLoader(reader, parts, plan.with_base, plan.compute_dtype, pooled=plan.chunked)
                       for _ in range(n_workers)]
            merge_pieces(plan_pieces(plan), loaders, merge, writer, done, window)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.bytes_written


def run_merge(recipe: Recipe, out: str | Path | None = None, options: MergeOptions | None = None, *,
              echo: Echo = print, models: Models | None = None, started_checksums: BackgroundChecksums | None = None,
              **overrides: Any) -> MergeResult:
    """The whole ``fuse merge``: ``recipe`` into ``out`` (default: the recipe's ``output.dir``) as
    ``options`` say (``overrides``: ``field=value`` changes to them, e.g. ``progress=False``). Writes
    nothing on any error (and nothing at all with ``dry_run``).

    Hub ids are resolved with :func:`fuse.hub.resolve_recipe` (``offline``, ``cache_dir``) unless
    ``models`` gives them already. A dry run fetches configs, tokenizer files and safetensors
    headers only. A real run whose models are not all local first runs the family check on those
    (so a bad recipe fails before gigabytes are downloaded), then downloads the weights.

    ``options.checksums``: hash the sources in a background thread started as soon as every model is
    on disk (it overlaps the family check and the merge); ``started_checksums``: hashing the caller
    already started (``fuse merge`` starts it before torch is imported)."""
    options = replace(options or MergeOptions(), **overrides)
    t0 = time.perf_counter()
    out = Path(out or recipe.output.dir)
    sums = started_checksums
    try:
        validate_recipe(recipe)
        if not options.dry_run:
            check_output(out, options.force)  # refuse before any work (and again when the output is published)
        fetch = dict(offline=options.offline, cache_dir=options.cache_dir, progress=options.progress, echo=echo)
        models = models or resolve_recipe(recipe, weights=False, **fetch)
        if not options.dry_run and not all(m.complete for m in models.values()):
            open_family(recipe, options.allow_foreign, models=models)  # configs + headers: refuse before downloading
            todo = sum(m.download_bytes for m in models.values())
            echo(f"family check on configs and headers passed; fetching {todo / 1e9:.2f} GB of weights")
            models = resolve_recipe(recipe, weights=True, **fetch)
        if sums is None and options.checksums and not options.dry_run:
            sums = start_checksums(models)
        return _run_merge(recipe, out, options, echo, sums, t0, models)
    except BaseException:
        if sums is not None:
            sums.cancel()
        raise


def _run_merge(recipe: Recipe, out: Path, options: MergeOptions, echo: Echo, sums: BackgroundChecksums | None,
               t0: float, models: Models) -> MergeResult:
    prep = open_family(recipe, options.allow_foreign, echo=echo, models=models)
    verdict = check_alignment(recipe, options, echo, models) if options.align_check else None
    base, members = prep.base, prep.members
    inputs = [(m.field + ".model", m.path) for m in members] + ([("base_model", base.path)] if base else [])
    refuse_overlap(out, inputs)  # even with --force, and in a dry run
    text_index = recipe.text_member_index()
    tok_src = tokenizer_source(recipe, members[text_index], base)
    plan = build_plan(recipe, base, members, prep.report.tensor_names, chunk_bytes=options.chunk_bytes)
    if plan.dtype_note and not options.dry_run:  # (a dry run prints it in the plan)
        warnings.warn(f"{recipe.label}: {plan.dtype_note}", UserWarning, stacklevel=2)
    if options.dry_run:
        echo(plan.describe(out))
        todo = [m for m in models.values() if not m.complete]
        if todo:
            echo(f"  to download      {sum(m.download_bytes for m in todo) / 1e9:.2f} GB of weights "
                 f"({', '.join(m.source for m in todo)}) into {todo[0].cache}")
        if out.exists() and not options.force:
            echo(f"note: {out} exists; the real run needs --force")
        echo("dry run: nothing written")
        return MergeResult(None, plan, prep.report, time.perf_counter() - t0)
    eos = union_eos(members, text_index, recipe.text.extra_eos_ids)
    with atomic_output_dir(out, force=options.force) as tmp:  # an OSError in here becomes one line naming OUT
        llm = tmp / LLM_DIR
        merge_llm(recipe, plan, base, members, llm, display_dir=out / LLM_DIR, options=options)
        cfg = llm_config(members[text_index], plan, eos)
        (llm / "config.json").write_text(json.dumps(cfg, indent=2))
        (llm / "generation_config.json").write_text(json.dumps(generation_config(cfg, eos), indent=2))
        copy_tokenizer(tok_src, llm)
        save_vision_branches(recipe, members, tmp / MEMBERS_DIR, models)
        sources = sums.result() if sums else {}
        fcfg = fuse_config(recipe, base, members, plan, text_index, eos, sources)
        if verdict is not None:
            fcfg["alignment"] = verdict.to_dict()
        write_configs(tmp, fcfg)
        (tmp / MODEL_CARD).write_text(model_card(fcfg))
    seconds = time.perf_counter() - t0
    echo(f"wrote {out}: llm/ ({len(plan.jobs)} tensors, {plan.llm_bytes / 1e9:.3f} GB), members: "
         f"{', '.join(m.name for m in members)} ({seconds:.1f} s)")
    return MergeResult(out, plan, prep.report, seconds)


def check_recipe(recipe: Recipe, options: MergeOptions | None = None, *, echo: Echo = print,
                 **overrides: Any) -> FamilyReport:
    """``fuse check``: print the family table; raise FamilyError if the merge would be refused (``options``:
    ``allow_foreign``, ``offline``, ``cache_dir``). Hub models not in the local cache are checked on their
    configs, tokenizers and headers only."""
    options = replace(options or MergeOptions(), **overrides)
    validate_recipe(recipe)
    models = resolve_recipe(recipe, weights=False, offline=options.offline, cache_dir=options.cache_dir, echo=echo)
    prep = open_family(recipe, options.allow_foreign, echo=echo, raise_bad=False, models=models)
    prep.report.raise_if_bad(recipe.label, options.allow_foreign)
    if options.align_check:
        check_alignment(recipe, options, echo, models, merging=False)
    return prep.report


def check_alignment(recipe: Recipe, options: MergeOptions, echo: Echo, models: Models | None = None,
                    merging: bool = True):
    """Print the alignment verdict of the recipe's members (:mod:`fuse.alignment`, on ``options.align_n``
    images of ``options.align_images`` or the built-in probe images); a ``warning:`` line when they are
    not aligned. It warns, never refuses. None (with a note) when a member's weights are not on disk yet
    (a hub model checked on its headers only)."""
    from ..alignment import recipe_alignment

    if models and not all(m.complete for m in models.values()):
        echo("alignment: skipped (it runs the members' vision branches: their weights are not all on disk yet)")
        return None

    paths = {src: files.path for src, files in (models or {}).items()}
    verdict = recipe_alignment(recipe, options.align_images, options.align_n, paths=paths)
    for line in verdict.lines():
        echo(line)
    if not verdict.aligned:
        echo("warning: the members' visual tokens are not aligned (their projectors do not write into one "
             "shared LLM input space); a fused model is unlikely to beat its members. "
             + ("Merging anyway." if merging else "`fuse merge` will warn, not refuse."))
    return verdict


__all__ = ["MergeResult", "OpenedFamily", "check_alignment", "check_recipe", "merge_llm", "open_family", "run_merge",
           "save_vision_branches"]
