"""Hugging Face Hub ids in recipes: fetch what a merge needs, nothing else.

A recipe value that is not a local path and looks like ``org/name`` is a hub id. It is resolved
to a local directory with ``huggingface_hub`` (its cache, progress bars, resumable downloads,
``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_TOKEN``):

- **Full** (``fuse merge``): ``snapshot_download`` of the safetensors weights, the JSON configs
  and the tokenizer files (:data:`META_PATTERNS`, :data:`WEIGHT_PATTERNS`). Pickled weights
  (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``), remote code (``*.py``) and sub-folders (e.g. the
  original Meta checkpoint under ``original/``) are never fetched (:data:`IGNORE_PATTERNS`).
- **Headers only** (``fuse check``, ``fuse merge --dry-run``, and the family check that
  ``fuse merge`` runs *before* it downloads any weights): configs and tokenizer files, plus every
  safetensors header through the hub's metadata API (``get_safetensors_metadata``: HTTP range
  reads of the first bytes of each file). The result is a :class:`ModelFiles` with ``headers``;
  :meth:`fuse.checkpoint.LazyCheckpoint.from_headers` reads it like a checkpoint without data.

A model already complete in the local cache is used without any network call. Offline
(``--offline`` or ``HF_HUB_OFFLINE=1``) only the cache is used. Every failure is a one-line
:class:`~fuse.errors.CheckpointError` naming the model id and what to do (log in for a gated
model, connect or pre-download when offline, ...).

This module imports neither torch nor ``huggingface_hub`` at import time (``fuse merge`` starts
its downloads and checksums before torch is loaded).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CheckpointError

META_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]
WEIGHT_PATTERNS = ["*.safetensors"]
IGNORE_PATTERNS = ["*/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.py", "*.msgpack", "*.h5",
                   "*.onnx", "*.gguf", "*.ot", "*.tflite"]
INDEX_NAME = "model.safetensors.index.json"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Echo = Callable[[str], None]


def offline_mode(offline: bool = False) -> bool:
    """``--offline``, or ``HF_HUB_OFFLINE`` set to a true value in the environment (read now)."""
    return offline or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_location(cache_dir: str | os.PathLike | None = None) -> str:
    """The hub cache directory in use (``cache_dir``, else ``HF_HUB_CACHE`` / ``HF_HOME``/hub)."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
                                              else constants.HF_HUB_CACHE)


@dataclass
class ModelFiles:
    """A recipe model resolved to local files.

    ``path``: the directory (a local checkpoint or a hub cache snapshot). ``headers``: for a
    headers-only view, ``{safetensors file name: header dict}`` (the weight files are not on
    disk); None when the weights are. ``download_bytes``: weight bytes still to download.
    ``cache``: the hub cache directory (hub models).
    """

    source: str
    path: Path
    repo_id: str | None = None
    headers: dict[str, dict] | None = None
    download_bytes: int = 0
    cache: str | None = None

    @property
    def complete(self) -> bool:
        return self.headers is None


def weights_present(path: Path) -> bool:
    """All safetensors weight files of a checkpoint dir are there (every shard the index names)."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all((path / s).is_file() for s in shards)
    return any(p.is_file() for p in path.glob("*.safetensors"))


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def _login_hint() -> str:
    return "log in with `hf auth login` or set HF_TOKEN"


def no_safetensors(repo: str) -> CheckpointError:
    return CheckpointError(f"{repo}: the Hub has no safetensors weights for it (fuse never loads pickled "
                           "*.bin/*.pt files); convert it to safetensors and give the local directory")


def hub_error(repo: str, e: BaseException, offline: bool, cache: str) -> CheckpointError:
    """One line for a huggingface_hub failure on ``repo``: what happened and what to do."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return CheckpointError(f"{repo}: gated model on the Hugging Face Hub: accept its licence at "
                               f"https://huggingface.co/{repo}, then {_login_hint()}")
    if isinstance(e, errors.RevisionNotFoundError):
        return CheckpointError(f"{repo}: revision not found on the Hugging Face Hub")
    if isinstance(e, errors.RepositoryNotFoundError):
        return CheckpointError(f"{repo}: no such model on the Hugging Face Hub (check the id; for a private "
                               f"model {_login_hint()})")
    if isinstance(e, errors.NotASafetensorsRepoError):
        return no_safetensors(repo)
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or offline:
        if offline:
            return CheckpointError(f"{repo}: not (fully) in the local Hugging Face cache {cache} and offline mode is "
                                   "on (--offline / HF_HUB_OFFLINE=1): run once with network access, or download it "
                                   f"first (`hf download {repo}`), or give a local directory")
        return CheckpointError(f"{repo}: cannot reach the Hugging Face Hub and the model is not in the local cache "
                               f"{cache}: check the network (or HF_ENDPOINT / proxy settings), or download it "
                               f"elsewhere and point HF_HOME at that cache")
    if isinstance(e, OSError) and getattr(e, "errno", None) == errno.ENOSPC:
        return CheckpointError(f"{repo}: disk full while downloading into {cache}")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status == 401:
            return CheckpointError(f"{repo}: the Hugging Face Hub refused access (HTTP 401): {_login_hint()}")
        return CheckpointError(f"{repo}: Hugging Face Hub error (HTTP {status}); try again later")
    return CheckpointError(f"{repo}: download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _snapshot(repo: str, patterns: list[str], offline: bool, cache_dir: str, progress: bool) -> Path:
    import huggingface_hub as hf

    with _progress(progress):
        return Path(hf.snapshot_download(repo, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS,
                                         cache_dir=cache_dir, local_files_only=offline))


def cached_snapshot(repo: str, cache_dir: str | os.PathLike | None = None, weights: bool = True) -> Path | None:
    """The cached snapshot of ``repo`` (no network): with ``weights``, only when its safetensors
    weights are complete; otherwise any snapshot with a ``config.json``. None when there is none."""
    import huggingface_hub as hf
    from huggingface_hub import errors

    try:
        path = Path(hf.snapshot_download(repo, allow_patterns=META_PATTERNS + WEIGHT_PATTERNS,
                                         ignore_patterns=IGNORE_PATTERNS, local_files_only=True,
                                         cache_dir=cache_location(cache_dir)))
    except (errors.LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() and (not weights or weights_present(path)) else None


def remote_headers(repo: str, revision: str | None) -> dict[str, dict]:
    """``{file name: safetensors header}`` of ``repo`` through the hub's metadata API (range reads)."""
    import huggingface_hub as hf

    meta = hf.get_safetensors_metadata(repo, revision=revision)
    headers = {}
    for fname, fmeta in meta.files_metadata.items():
        h: dict[str, Any] = {"__metadata__": dict(fmeta.metadata or {})}
        for name, info in fmeta.tensors.items():
            h[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
        headers[fname] = h
    return headers


def data_bytes(header: dict) -> int:
    return max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)


def local_model(source: str, cache_dir: str | os.PathLike | None = None, weights: bool = True) -> ModelFiles | None:
    """``source`` as a local directory, or as a snapshot in the hub cache (complete safetensors
    weights unless ``weights=False``); None when it would need the network (no network call here)."""
    p = Path(source)
    if p.exists():
        return ModelFiles(str(source), p)
    if not HUB_ID.fullmatch(str(source)):
        raise CheckpointError(f"{source}: no such checkpoint directory")
    done = cached_snapshot(str(source), cache_dir, weights)
    return ModelFiles(str(source), done, str(source), cache=cache_location(cache_dir)) if done is not None else None


def resolve_model(source: str, weights: bool = True, offline: bool = False, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, echo: Echo | None = None) -> ModelFiles:
    """Local files for one recipe model (see the module docstring). Raises CheckpointError."""
    found = local_model(source, cache_dir)
    if found is not None:
        return found
    repo, offline = str(source), offline_mode(offline)
    cache = cache_location(cache_dir)  # read now: HF_HOME may have changed since huggingface_hub was imported
    try:
        if weights:
            if echo is not None and not offline:
                echo(f"downloading {repo} (safetensors weights, configs, tokenizer) into {cache}")
            path = _snapshot(repo, META_PATTERNS + WEIGHT_PATTERNS, offline, cache, progress)
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{repo}: the Hub repository has no config.json (not a transformers model)")
            if not weights_present(path):
                raise hub_error(repo, FileNotFoundError(repo), True, cache) if offline else no_safetensors(repo)
            return ModelFiles(repo, path, repo, cache=cache)
        if offline:
            raise hub_error(repo, FileNotFoundError(repo), True, cache)
        path = _snapshot(repo, META_PATTERNS, False, cache, progress)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{repo}: the Hub repository has no config.json (not a transformers model)")
        headers = remote_headers(repo, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None)
        todo = sum(data_bytes(h) for f, h in headers.items() if not (path / f).is_file())
        return ModelFiles(repo, path, repo, headers=headers, download_bytes=todo, cache=cache)
    except CheckpointError:
        raise
    except Exception as e:  # huggingface_hub / httpx errors -> one actionable line
        raise hub_error(repo, e, offline, cache) from None


def recipe_sources(recipe) -> list[tuple[str, str]]:
    """``[(recipe field, model)]``: the base (if any), then the members."""
    out = [("base_model", recipe.base_model)] if recipe.base_model else []
    return out + [(f"members[{i}].model", m.model) for i, m in enumerate(recipe.members)]


def resolve_recipe(recipe, weights: bool = True, offline: bool = False, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True, echo: Echo | None = None, local_only: bool = False
                   ) -> dict[str, ModelFiles] | None:
    """``{recipe model value: ModelFiles}`` for every model of ``recipe`` (errors name the recipe field).

    ``local_only``: no network and no download; None if a model is not local or complete in the cache.
    """
    out: dict[str, ModelFiles] = {}
    for fld, source in recipe_sources(recipe):
        if source in out:
            continue
        try:
            got = local_model(source, cache_dir) if local_only else \
                resolve_model(source, weights, offline, cache_dir, progress, echo)
        except CheckpointError as e:
            raise CheckpointError(f"{recipe.label}: {fld}: {e}") from None
        if got is None:
            return None
        out[source] = got
    return out


__all__ = ["IGNORE_PATTERNS", "META_PATTERNS", "WEIGHT_PATTERNS", "ModelFiles", "cache_location", "cached_snapshot",
           "data_bytes", "hub_error", "local_model", "no_safetensors", "offline_mode", "recipe_sources",
           "remote_headers", "resolve_model", "resolve_recipe", "weights_present"]
