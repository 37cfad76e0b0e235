"""The training loop on ``accelerate``: one process on CPU, or DDP / FSDP / DeepSpeed via ``accelerate launch``.

One optimizer step = ``accumulation`` micro-batches of ``per_device_batch_size`` on every
process; the global batch ``G = per_device x processes x accumulation`` is a fixed set of
samples whatever the process count (see :func:`train.data.rank_micro_batches`).

Loss normalisation: the step's loss is the mean over *all* target tokens of the global
batch. Each micro-batch's token-loss sum is divided by ``N_global / (P x A)`` (``N_global``
all-reduced before the first backward); ``accelerate`` divides by ``A`` and DDP averages
over ``P``, so the gradient is exactly ``d(sum of token losses)/N_global``: one process
with batch 4 and two processes with batch 2 follow the same curve.

AdamW (decay on >= 2-D weights only), warmup + cosine (transformers' scheduler),
gradient clipping, autocast bf16 on GPU, optional gradient checkpointing, ``max_steps``,
evaluation every N steps, atomic checkpoints every N steps and at the end, exact resume.
The final output is a ``comm`` member directory (``<output_dir>/final``) that
``fuse.members.load_member`` reads.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuse.dtypes import torch_dtype
from fuse.errors import CheckpointError, DataError, RecipeError
from fuse.fused_layout import union_eos_ids
from fuse.fusions import build_fusion
from fuse.members.comm import CommBranch, save_comm_member
from fuse.members.common import as_list, eos_ids
from fuse.members.text import load_tokenizer
from fuse.output_dir import atomic_output_dir, check_output

from .checkpointing import CHECKPOINTS, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import (IGNORE, BadSamples, Collator, ConversationDataset, ConversationEncoder, ListBatchSampler,
                   eval_micro_batches, rank_micro_batches, step_batches)
from .engines import accelerator_kwargs, check_engine, engine_name
from .fusion import build_branch, encoder_dtype
from .logs import RunLogger
from .model import CommModel, load_llm, read_previous_stage, set_trainable

FINAL = "final"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    checkpoint: Path | None
    step: int
    stopped_early: bool = False
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)


def resolve_mixed_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(cfg: TrainConfig):
    """A fresh ``Accelerator`` for this run (state singletons reset so several runs can share a process).

    Without CUDA it runs on CPU; under ``accelerate launch --multi_gpu`` / torchrun that is
    multi-process CPU training over gloo (DDP), and with a DeepSpeed config DeepSpeed's CPU
    accelerator over gloo (see :mod:`train.engines`).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision), step_scheduler_with_optimizer=False,
                      **accelerator_kwargs())
    check_engine(acc)
    num_processes = acc.num_processes
    accum = cfg.accumulation_steps(num_processes)
    acc.gradient_accumulation_steps = accum
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        acc.state.deepspeed_plugin.gradient_accumulation_steps = accum
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = cfg.per_device_batch_size * accum * num_processes
        if cfg.max_grad_norm:
            ds["gradient_clipping"] = cfg.max_grad_norm
    return acc, accum


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on >= 2-D weights, none on biases / norms / layerscale logits."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`train` runs to the end (or ``stop_at_step``)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.acc, self.accum = make_accelerator(cfg)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self.P = self.acc.num_processes
        self.rank = self.acc.process_index
        self.out = Path(cfg.output_dir)
        self.on_gpu = self.acc.device.type == "cuda"
        self.resume_from = self._resume_path()
        if cfg.tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise RecipeError("tensorboard: true needs the tensorboard package "
                                  "(pip install 'visionfuse-toolkit[tensorboard]')") from None
        self._check_output_dir()

        self.prev = None
        self._build_model()
        self._build_data()
        self._build_optim()
        self.step_idx = 0
        self.tokens_seen = 0
        self.runtime_bad = 0
        self.truncated = 0
        self.bad_detail = BadSamples()
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        if self.resume_from is not None:
            self._resume(self.resume_from)

    # -- setup ----------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        return find_checkpoint(self.out if r == "auto" else r)

    def _check_output_dir(self) -> None:
        """Before any work: the output dir is writable, ``final/`` may be replaced at the end (only an
        earlier export of this toolkit is), and a run already there needs --resume or --force (which
        removes only its step checkpoints)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.out):
                pass
        except OSError as e:
            raise CheckpointError(f"{self.out}: cannot write the output directory ({e.strerror})") from None
        cfg = self.cfg
        check_output(self.out / FINAL, force=True, inputs=[("--from", cfg.from_dir), ("--llm", cfg.llm),
                                                           ("--data", cfg.data.train),
                                                           ("--image-root", cfg.data.image_root)])
        if self.resume_from is not None:
            return
        used = [p.name for p in self.out.iterdir() if p.name in (CHECKPOINTS, FINAL, "train_log.jsonl")]
        if used and not self.cfg.force:
            raise CheckpointError(f"{self.out}: output_dir already holds a run ({', '.join(sorted(used))}); "
                                  "pass --resume to continue it or --force to start over")
        self.acc.wait_for_everyone()
        if used and self.acc.is_main_process:
            for _, ckpt in list_checkpoints(self.out / CHECKPOINTS):
                shutil.rmtree(ckpt)
        self.acc.wait_for_everyone()

    def _build_model(self) -> None:
        cfg = self.cfg
        if cfg.stage == 2 and not cfg.from_dir:
            raise RecipeError("stage 2 needs --from <stage-1 output dir> (config key `from`)")
        if cfg.from_dir:
            prev_cfg, branch = read_previous_stage(cfg.from_dir)
            stored = prev_cfg["fusion"]["type"]
            if "type" in cfg.fusion.model_fields_set and cfg.fusion.type != stored:
                raise CheckpointError(f"{prev_cfg['_dir']}: the previous stage trained a {stored!r} fusion; this "
                                      f"config says fusion.type {cfg.fusion.type!r}")
            for r, enc in branch.encoders.items():
                d = cfg.encoders[r].dtype if r in cfg.encoders else "auto"
                enc.to(encoder_dtype(d, self.on_gpu))
            llm = load_llm(prev_cfg["_dir"], text_config=prev_cfg["text_config"])
            tok = load_tokenizer(prev_cfg["_dir"])
            self.prev = prev_cfg
            self.llm_source = prev_cfg.get("training", {}).get("llm") or prev_cfg["_dir"]
        else:
            if not cfg.llm:
                raise RecipeError("llm: set the base LLM (a local dir or hub id) for stage 1")
            llm = load_llm(cfg.llm)
            tok = load_tokenizer(cfg.llm)
            branch = build_branch(cfg, llm.get_input_embeddings().embedding_dim, self.on_gpu)
            self.llm_source = cfg.llm
        if branch.fusion.spec.llm_hidden != llm.get_input_embeddings().embedding_dim:
            raise CheckpointError(f"fusion output width {branch.fusion.spec.llm_hidden} != LLM hidden size "
                                  f"{llm.get_input_embeddings().embedding_dim}")
        if cfg.gradient_checkpointing:
            kw = {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        llm.config.use_cache = False
        self.branch: CommBranch = branch
        self.tokenizer = tok
        model = CommModel(branch.fusion, llm)
        self.trainable_names = set_trainable(model, cfg.trainable)
        # before FSDP shards them; ZeRO-3 may have partitioned the LLM at load (ds_numel = full size)
        self.n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        self.raw_model = model

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        if not d.train:
            raise RecipeError("data.train: set the training data (LLaVA conversation JSON / JSONL)")
        if not d.image_root:
            raise RecipeError("data.image_root: set the directory the records' image paths are relative to")
        self.encoder = ConversationEncoder(self.tokenizer, self.branch.num_tokens, d.max_length, d.template)
        self.train_ds = ConversationDataset(d.train, d.image_root, self.encoder, d.max_bad_share, "data.train")
        self.eval_ds = None
        if d.eval:
            self.eval_ds = ConversationDataset(d.eval, d.eval_image_root or d.image_root, self.encoder,
                                               d.max_bad_share, "data.eval")
        self.collator = Collator(self.encoder.pad_id, self.branch.preprocess)
        self.global_batch = cfg.per_device_batch_size * self.P * self.accum
        self.steps_per_epoch = len(self.train_ds) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"data.train: {len(self.train_ds)} usable records, fewer than one global batch "
                            f"({self.global_batch}); lower global_batch_size")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.dropped_per_epoch = len(self.train_ds) - self.steps_per_epoch * self.global_batch

    def _build_optim(self) -> None:
        from transformers import get_scheduler

        cfg = self.cfg
        opt = torch.optim.AdamW(param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas,
                                eps=cfg.adam_eps)
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(self.raw_model, opt, sched)
        self.branch.encoders.to(self.acc.device)

    def expected_state(self) -> dict[str, Any]:
        return {"fusion": self.branch.fusion.spec.to_dict(), "stage": self.cfg.stage,
                "global_batch_size": self.global_batch, "total_steps": self.total_steps}

    def _resume(self, ckpt: Path) -> None:
        state = load_checkpoint(self.acc, ckpt, self.expected_state(), self.optimizer.optimizer)
        self.step_idx = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.runtime_bad = int(state.get("runtime_bad", 0))
        self.truncated = int(state.get("truncated", 0))
        self.losses = list(state.get("losses", []))
        self.eval_losses = [tuple(x) for x in state.get("eval_losses", [])]

    # -- one optimizer step ---------------------------------------------------------------------
    def _to_device(self, mb: dict[str, Any]) -> dict[str, Any]:
        dev = self.acc.device
        out = {k: mb[k].to(dev) for k in ("input_ids", "labels", "attention_mask", "image_mask")}
        out["pixels"] = mb["pixels"]
        return out

    def _features(self, pixels: dict | None) -> dict[str, torch.Tensor] | None:
        if pixels is None:
            return None
        return self.branch.encode({k: v.to(self.acc.device) for k, v in pixels.items()})

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over this process's ``accumulation`` micro-batches; returns global stats."""
        acc, model = self.acc, self.model
        model.train()
        dev = acc.device
        local = torch.tensor([sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches),
                              sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                              sum(len(mb["bad"]) for mb in micro_batches),
                              sum(mb["n_truncated"] for mb in micro_batches)], dtype=torch.float64, device=dev)
        glob = acc.reduce(local, "sum") if self.P > 1 else local
        n_items, n_tokens, n_bad, n_trunc = (float(x) for x in glob.tolist())
        denom = torch.tensor(max(n_items, 1.0) / (self.P * self.accum), dtype=torch.float32, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        grad_norm = None
        for mb in micro_batches:
            for reason, where in mb["bad"]:
                self.bad_detail.add(reason, where)
            b = self._to_device(mb)
            with acc.accumulate(model):
                feats = self._features(b["pixels"])
                with acc.autocast():
                    out = model(b["input_ids"], b["attention_mask"], b["image_mask"], labels=b["labels"], feats=feats,
                                num_items_in_batch=denom)
                loss = out.loss
                acc.backward(loss * self.accum)  # accelerate / DeepSpeed divide by the accumulation again
                loss_sum += loss.detach().double() * denom.double()
                if acc.sync_gradients:
                    if self.cfg.max_grad_norm:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        total = acc.reduce(loss_sum, "sum") if self.P > 1 else loss_sum
        self.runtime_bad += int(n_bad)
        self.truncated += int(n_trunc)
        self.tokens_seen += int(n_tokens)
        return {"loss": float(total) / max(n_items, 1.0), "tokens": int(n_tokens), "targets": int(n_items),
                "grad_norm": float(grad_norm) if grad_norm is not None else None}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        from torch.utils.data import DataLoader

        assert self.eval_ds is not None
        model = self.model
        model.eval()
        batches = eval_micro_batches(len(self.eval_ds), self.cfg.per_device_batch_size, self.P, self.rank)
        if self.cfg.eval_max_batches:
            batches = batches[: self.cfg.eval_max_batches]
        loader = DataLoader(self.eval_ds, batch_sampler=ListBatchSampler(batches), collate_fn=self.collator,
                            num_workers=self.cfg.data.num_workers)
        dev = self.acc.device
        sums = torch.zeros(2, dtype=torch.float64, device=dev)
        one = torch.tensor(1.0, device=dev)
        for mb in loader:
            b = self._to_device(mb)
            feats = self._features(b["pixels"])
            with self.acc.autocast():
                out = model(b["input_ids"], b["attention_mask"], b["image_mask"], labels=b["labels"], feats=feats,
                            num_items_in_batch=one)
            sums[0] += out.loss.double()
            sums[1] += float((b["labels"][:, 1:] != IGNORE).sum())
        sums = self.acc.reduce(sums, "sum") if self.P > 1 else sums
        model.train()
        return float(sums[0] / sums[1].clamp(min=1))

    # -- the run --------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_step: int):
        from torch.utils.data import DataLoader

        cfg = self.cfg
        steps = step_batches(self.train_ds.lengths, self.global_batch, cfg.seed, epoch, cfg.data.group_by_length)
        micro = rank_micro_batches(steps, self.accum, self.P, cfg.per_device_batch_size, self.rank)
        micro = micro[start_step * self.accum:]
        return iter(DataLoader(self.train_ds, batch_sampler=ListBatchSampler(micro), collate_fn=self.collator,
                               num_workers=cfg.data.num_workers, pin_memory=self.on_gpu,
                               persistent_workers=False))

    def _state(self) -> dict[str, Any]:
        return {**self.expected_state(), "step": self.step_idx, "epoch": self.step_idx // self.steps_per_epoch,
                "step_in_epoch": self.step_idx % self.steps_per_epoch, "num_processes": self.P,
                "accumulation": self.accum, "tokens_seen": self.tokens_seen, "runtime_bad": self.runtime_bad,
                "truncated": self.truncated, "losses": self.losses, "eval_losses": self.eval_losses,
                "config": self.cfg.to_yaml_dict()}

    def save(self) -> Path:
        return save_checkpoint(self.acc, self.out / CHECKPOINTS, self.step_idx, self._state(),
                               self.cfg.keep_checkpoints)

    def train(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        log = RunLogger(self.out, main, self.total_steps, self.step_idx, cfg.tensorboard, cfg.progress)
        if self.step_idx == 0:
            log.event(0, "start", fusion=self.branch.fusion.spec.type, visual_tokens=self.branch.num_tokens,
                      trainable=cfg.trainable, n_trainable=self.n_trainable,
                      records=self.train_ds.total_records, usable=len(self.train_ds),
                      bad_records=self.train_ds.bad.total, steps=self.total_steps, global_batch=self.global_batch,
                      accumulation=self.accum, processes=self.P, dropped_per_epoch=self.dropped_per_epoch,
                      engine=engine_name(acc))
        else:
            log.event(self.step_idx, "resume", checkpoint=str(self.resume_from))
        last_ckpt = None
        try:
            while self.step_idx < self.total_steps:
                epoch, k = divmod(self.step_idx, self.steps_per_epoch)
                it = self._loader(epoch, k)
                for _ in range(k, self.steps_per_epoch):
                    t0 = time.perf_counter()
                    mbs = [next(it) for _ in range(self.accum)]
                    stats = self.train_step(mbs)
                    dt = time.perf_counter() - t0
                    self.step_idx += 1
                    self.losses.append(stats["loss"])
                    self._check_bad()
                    lr = float(self.scheduler.get_last_lr()[0])
                    metrics = {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                               "tokens": stats["tokens"], "tokens_per_s": stats["tokens"] / max(dt, 1e-9),
                               "step_time": dt, "epoch": epoch}
                    log.step(self.step_idx, metrics, log=self.step_idx % cfg.log_every == 0)
                    if cfg.eval_every and self.eval_ds is not None and self.step_idx % cfg.eval_every == 0:
                        ev = self.evaluate()
                        self.eval_losses.append((self.step_idx, ev))
                        log.event(self.step_idx, "eval", loss=round(ev, 6))
                    stop = cfg.stop_at_step is not None and self.step_idx >= cfg.stop_at_step
                    if (cfg.save_every and self.step_idx % cfg.save_every == 0) or stop \
                            or self.step_idx == self.total_steps:
                        last_ckpt = self.save()
                        log.event(self.step_idx, "checkpoint", path=str(last_ckpt))
                    if stop:
                        log.event(self.step_idx, "stopped", reason="stop_at_step")
                        return TrainResult(self.out, None, last_ckpt, self.step_idx, True, self.losses,
                                           self.eval_losses)
                    if self.step_idx >= self.total_steps:
                        break
            if self.eval_ds is not None and (not self.eval_losses or self.eval_losses[-1][0] != self.step_idx):
                ev = self.evaluate()
                self.eval_losses.append((self.step_idx, ev))
                log.event(self.step_idx, "eval", loss=round(ev, 6))
            if self.truncated:
                log.event(self.step_idx, "note", truncated=self.truncated, max_length=cfg.data.max_length)
            final = self.export()
            log.event(self.step_idx, "final", path=str(final))
        finally:
            log.close()
        return TrainResult(self.out, final, last_ckpt, self.step_idx, False, self.losses, self.eval_losses)

    def _check_bad(self) -> None:
        n = self.train_ds.bad.total + self.runtime_bad
        if n > self.cfg.data.max_bad_share * self.train_ds.total_records:
            merged = BadSamples(self.train_ds.bad.counts + self.bad_detail.counts,
                                {**self.bad_detail.first, **self.train_ds.bad.first})
            self.train_ds.bad = merged
            self.train_ds.check_bad_share(n, "data.train")

    # -- final member -----------------------------------------------------------------------------
    def save_dtype(self) -> torch.dtype | None:
        name = self.cfg.save_dtype
        if name == "auto":
            return torch.bfloat16 if self.acc.mixed_precision == "bf16" else None
        return torch_dtype(name)

    def export(self) -> Path:
        """Write ``<output_dir>/final`` (format ``comm``) atomically; collective call."""
        acc = self.acc
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        final = self.out / FINAL
        if acc.is_main_process:
            fusion = build_fusion(self.branch.fusion.spec)
            fusion.load_state_dict({k[len("fusion."):]: v for k, v in state.items() if k.startswith("fusion.")})
            branch = CommBranch(dict(self.branch.encoders.items()), fusion, self.branch.sources)
            llm = acc.unwrap_model(self.model).llm
            text_config = llm.config.to_dict()
            tie = bool(getattr(llm.config, "tie_word_embeddings", False))
            llm_tensors = ((k[len("llm."):], v) for k, v in state.items() if k.startswith("llm.")
                           and not (tie and k == "llm.lm_head.weight"))
            eos = self._eos_ids(llm)
            training = {"stage": self.cfg.stage, "preset": self.cfg.preset, "steps": self.step_idx,
                        "global_batch_size": self.global_batch, "lr": self.cfg.lr, "trainable": self.cfg.trainable,
                        "data": self.cfg.data.train, "from": self.prev["_dir"] if self.prev else None,
                        "llm": self.llm_source, "final_loss": self.losses[-1] if self.losses else None}
            prompt_style = "chat_template" if self.cfg.data.template == "chat_template" else "llava_v1"
            with atomic_output_dir(final, force=True) as tmp:
                save_comm_member(tmp, branch, llm_tensors, text_config, tokenizer=self.tokenizer,
                                 prompt_style=prompt_style, eos_token_ids=eos, store_encoders=self.cfg.store_encoders,
                                 training=training, max_shard=self.cfg.max_shard_size, dtype=self.save_dtype())
        acc.wait_for_everyone()
        return final

    def _eos_ids(self, llm) -> list[int]:
        """The trained member's eos ids: the source LLM's files', its generation config's, the tokenizer's."""
        src = Path(str(self.llm_source))
        gen = getattr(llm, "generation_config", None)
        return union_eos_ids(eos_ids(src, llm.config.to_dict()) if src.is_dir() else [],
                             as_list(getattr(gen, "eos_token_id", None)), as_list(self.tokenizer.eos_token_id))


__all__ = ["FINAL", "TrainResult", "Trainer", "make_accelerator", "param_groups", "resolve_mixed_precision"]
