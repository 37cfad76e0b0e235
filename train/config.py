"""Training configuration: pydantic schema, stage presets, YAML + ``key=value`` overrides.

A run is described by one :class:`TrainConfig`. Sources, lowest priority first:
stage preset (:data:`PRESETS`, picked by ``preset`` + ``stage``) < recipe YAML < overrides
(``--set fusion.mlp_ratio=4`` / CLI flags). Unknown keys anywhere are an error that lists
the valid keys of that section.

Presets (what each stage trains, learning rate, global batch):

=========  =====  =======================  ======  ============
preset     stage  trainable                lr      global batch
=========  =====  =======================  ======  ============
comm       1      fusion + llm (paper)     2e-5    64
comm       2      fusion + llm             2e-5    64
llava      1      fusion (projector) only  1e-3    256
llava      2      fusion + llm             2e-5    128
=========  =====  =======================  ======  ============

Encoders are always frozen. ``fusion`` covers every fusion/projector parameter.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fuse.errors import RecipeError
from fuse.recipe import check_yaml_size

TRAINABLE_GROUPS = ("fusion", "llm")

PRESETS: dict[tuple[str, int], dict[str, Any]] = {
    ("comm", 1): {"trainable": ["fusion", "llm"], "lr": 2e-5, "global_batch_size": 64},
    ("comm", 2): {"trainable": ["fusion", "llm"], "lr": 2e-5, "global_batch_size": 64},
    ("llava", 1): {"trainable": ["fusion"], "lr": 1e-3, "global_batch_size": 256},
    ("llava", 2): {"trainable": ["fusion", "llm"], "lr": 2e-5, "global_batch_size": 128},
}

DEFAULT_ENCODERS = {
    "clip": {"kind": "clip", "source": "openai/clip-vit-large-patch14-336"},
    "dinov2": {"kind": "dinov2", "source": "facebook/dinov2-large"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class EncoderConfig(_Strict):
    """One frozen encoder. ``source`` (dir / hub id) or ``config`` (random init, for tests)."""

    kind: Optional[str] = None  # registry name in fuse.encoders; defaults to the role name
    source: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    image_size: Optional[int] = None  # processor resize/crop side (DINOv2 defaults to 336 for /14)
    pad_square: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU

    @model_validator(mode="after")
    def _one_source(self):
        if (self.source is None) == (self.config is None):
            raise ValueError("set exactly one of source (dir / hub id) or config (random init)")
        return self


class FusionConfig(_Strict):
    """Which fusion module and its options (see :mod:`fuse.fusions`)."""

    type: str = "comm"
    layers: dict[str, Union[str, int, list[int]]] = Field(default_factory=dict)  # role -> selector
    encoder: Optional[str] = None  # single-encoder variants: which encoder (default clip)
    projector: Optional[str] = None  # default: the fusion's own (linear for comm)
    mlp_depth: int = 2
    mlp_ratio: int = 8
    concat: Literal["channel", "token"] = "channel"
    width: Optional[int] = None
    alpha: float = 0.5
    conv_kernel: int = 3

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        from fuse.fusions import FUSIONS  # (torch: imported when a config is validated, not with this module)

        if v not in FUSIONS:
            raise ValueError(f"unknown fusion type {v!r}; known: {', '.join(sorted(FUSIONS))}")
        return v


class DataConfig(_Strict):
    train: Optional[str] = None  # LLaVA conversation JSON (list) or JSONL
    image_root: Optional[str] = None
    eval: Optional[str] = None
    eval_image_root: Optional[str] = None  # default: image_root
    max_length: int = Field(2048, gt=0)
    group_by_length: bool = True
    num_workers: int = Field(2, ge=0)
    max_bad_share: float = Field(0.01, ge=0.0, le=1.0)
    template: Literal["chat_template", "llava_v1"] = "chat_template"


class TrainConfig(_Strict):
    stage: Literal[1, 2] = 1
    preset: Literal["comm", "llava"] = "comm"
    llm: Optional[str] = None  # base LLM (dir / hub id); stage 2 takes it from `from`
    from_dir: Optional[str] = Field(None, alias="from")  # previous stage's output (final member dir)
    output_dir: str = "runs/comm"
    encoders: dict[str, EncoderConfig] = Field(default_factory=lambda: {k: EncoderConfig(**v) for k, v in DEFAULT_ENCODERS.items()})
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    trainable: Optional[list[Literal["fusion", "llm"]]] = None
    lr: Optional[float] = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    global_batch_size: Optional[int] = Field(None, gt=0)
    per_device_batch_size: int = Field(4, gt=0)
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy's seed range (accelerate.set_seed seeds numpy too)

    save_every: Optional[int] = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: Optional[int] = Field(None, gt=0)
    eval_max_batches: Optional[int] = Field(None, gt=0)
    log_every: int = Field(1, gt=0)
    tensorboard: bool = False
    progress: bool = True

    store_encoders: bool = True
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: str = "5GB"
    resume: Optional[str] = None
    force: bool = False
    stop_at_step: Optional[int] = Field(None, gt=0)  # simulate preemption: checkpoint at this step, then exit

    @model_validator(mode="after")
    def _check(self):
        if self.eval_every and not self.data.eval:
            raise ValueError("eval_every needs data.eval (an evaluation JSON)")
        return self

    # -- derived ---------------------------------------------------------------------------
    def accumulation_steps(self, num_processes: int) -> int:
        """Gradient accumulation so that per_device * processes * accumulation == global batch."""
        per_step = self.per_device_batch_size * num_processes
        gb = self.global_batch_size or per_step
        if gb % per_step:
            raise RecipeError(f"global_batch_size {gb} is not a multiple of per_device_batch_size "
                              f"{self.per_device_batch_size} x {num_processes} processes")
        return gb // per_step

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# -- loading -------------------------------------------------------------------------------------------------


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted((f.alias or n) for n, f in model.model_fields.items())


def _section_model(loc: tuple) -> type[BaseModel]:
    """The pydantic model that owns the field at ``loc`` (for 'valid keys' messages)."""
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part) or next((x for x in model.model_fields.values() if x.alias == part), None)
        if f is None:
            break
        ann = f.annotation
        sub = _model_in(ann)
        if sub is None:
            continue  # e.g. dict[str, EncoderConfig]: next part is the dict key
        model = sub
    return model


def _model_in(ann) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _model_in(a)
        if m is not None:
            return m
    return None


def _format_error(e: ValidationError, where: str) -> RecipeError:
    err = e.errors()[0]
    loc = tuple(err.get("loc", ()))
    dotted = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        model = _section_model(loc)
        section = ".".join(str(p) for p in loc[:-1])
        return RecipeError(f"{where}: unknown key {dotted!r}; valid keys{' in ' + section if section else ''}: "
                           f"{', '.join(_valid_keys(model))}")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return RecipeError(f"{where}: {dotted}: {msg}{more}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value (e.g. fusion.mlp_ratio=4)")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return [p for p in key.strip().split(".") if p], value


def set_dotted(d: dict, path: list[str], value: Any) -> None:
    cur = d
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{p}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: expected a mapping of config keys at the top level")
    check_yaml_size(data, str(p))
    return data


def apply_overrides(data: dict[str, Any], overrides: Any) -> dict[str, Any]:
    """Apply ``{"a.b": v}`` or ``["a.b=v", ...]`` overrides to a config dict in place; returns it."""
    if isinstance(overrides, dict):
        for k, v in overrides.items():
            set_dotted(data, k.split("."), v)
    else:
        for item in overrides or []:
            keys, value = parse_override(item)
            set_dotted(data, keys, value)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                **fields: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML file, ``key=value`` overrides and keyword fields.

    Stage presets fill ``trainable``, ``lr`` and ``global_batch_size`` when none of the
    sources set them.
    """
    data: dict[str, Any] = read_yaml(path) if path else {}
    where = str(path) if path else "config"
    data = apply_overrides(copy.deepcopy(data), overrides)
    for k, v in fields.items():
        if v is not None:
            set_dotted(data, [("from" if k in ("from_dir", "from_") else k)], v)
    return config_from_dict(data, where)


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    data = copy.deepcopy(data)
    try:
        stage = int(data.get("stage", 1))
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: stage: expected 1 or 2, got {data.get('stage')!r}") from None
    preset = PRESETS.get((str(data.get("preset", "comm")), stage), {})
    for k, v in preset.items():
        if data.get(k) is None:
            data[k] = copy.deepcopy(v)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise _format_error(e, where) from None


__all__ = ["DataConfig", "EncoderConfig", "FusionConfig", "PRESETS", "TRAINABLE_GROUPS", "TrainConfig",
           "config_from_dict", "load_config", "parse_override", "read_yaml", "set_dotted"]
