"""A stand-in for the Hugging Face Hub at the ``huggingface_hub`` boundary (tests have no network).

:class:`FakeHub` serves local checkpoint directories under real repo ids through the functions
:mod:`fuse.hub` calls (``snapshot_download``, ``get_safetensors_metadata``; also
``hf_hub_download``), writing into a cache laid out as the hub lays it out::

    <cache>/models--<org>--<name>/refs/main                      commit id
    <cache>/models--<org>--<name>/blobs/<sha256 | git sha1>      file contents
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>      -> ../../blobs/<hash>

(LFS files such as ``*.safetensors`` are stored under their SHA-256, other files under their
git blob SHA-1.) File selection uses huggingface_hub's own ``filter_repo_objects``, so the
``allow_patterns`` / ``ignore_patterns`` a caller passes select exactly what the real hub would.
It can also play a hub that is unreachable (``network=False``), gated repos and missing repos,
raising huggingface_hub's own error types. Every call is recorded in ``calls``.

    hub = FakeHub({"meta-llama/Meta-Llama-3-8B-Instruct": base_dir}, gated={...})
    hub.install(monkeypatch)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".tiktoken")


def _response(status: int, repo: str):
    """An HTTP response object of the client library huggingface_hub's errors are built on."""
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub < 2
        import httpx
    return httpx.Response(status, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo}"))


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    """Local directories served as hub repos (``{repo id: directory}``, top-level files and sub-folders)."""

    repos: dict[str, Path]
    gated: set[str] = field(default_factory=set)
    network: bool = True
    calls: list[dict] = field(default_factory=list)

    # -- hub side -------------------------------------------------------------
    def files(self, repo: str) -> list[str]:
        root = Path(self.repos[repo])
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def _online(self, repo: str) -> None:
        from huggingface_hub import errors

        if not self.network:
            raise errors.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub "
                                                 "(ConnectError), and no cached snapshot was found")
        if repo not in self.repos:
            raise errors.RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {repo}",
                                                 response=_response(404, repo))
        if repo in self.gated and not os.environ.get("HF_TOKEN"):
            raise errors.GatedRepoError(f"403 Client Error: Cannot access gated repo {repo}",
                                        response=_response(403, repo))

    # -- cache side -----------------------------------------------------------
    @staticmethod
    def repo_folder(cache: str | Path, repo: str) -> Path:
        return Path(cache) / ("models--" + repo.replace("/", "--"))

    def _store(self, cache: str | Path, repo: str, name: str) -> None:
        folder = self.repo_folder(cache, repo)
        data = (Path(self.repos[repo]) / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else _git_sha1(data)
        blob = folder / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = folder / "snapshots" / self.commit(repo) / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(self.commit(repo))

    def _cached(self, cache: str | Path, repo: str) -> Path:
        from huggingface_hub import errors

        folder = self.repo_folder(cache, repo)
        ref = folder / "refs" / "main"
        if not ref.is_file():
            raise errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the "
                                                 "specified revision on the local disk")
        return folder / "snapshots" / ref.read_text().strip()

    # -- the patched functions --------------------------------------------------
    def snapshot_download(self, repo_id: str, *, allow_patterns=None, ignore_patterns=None, cache_dir=None,
                          local_files_only: bool = False, revision=None, **_: object) -> str:
        from huggingface_hub import constants
        from huggingface_hub.utils import filter_repo_objects

        cache = cache_dir or constants.HF_HUB_CACHE
        self.calls.append({"fn": "snapshot_download", "repo": repo_id, "allow": allow_patterns,
                           "ignore": ignore_patterns, "local_files_only": local_files_only, "cache": str(cache)})
        if local_files_only:
            return str(self._cached(cache, repo_id))
        try:
            self._online(repo_id)
        except Exception:
            if not self.network:  # like huggingface_hub: fall back to a cached snapshot, if any
                return str(self._cached(cache, repo_id))
            raise
        wanted = list(filter_repo_objects(self.files(repo_id), allow_patterns=allow_patterns,
                                          ignore_patterns=ignore_patterns))
        for name in wanted:
            self._store(cache, repo_id, name)
        self.calls[-1]["fetched"] = wanted
        snap = self.repo_folder(cache, repo_id) / "snapshots" / self.commit(repo_id)
        snap.mkdir(parents=True, exist_ok=True)
        (self.repo_folder(cache, repo_id) / "refs").mkdir(exist_ok=True)
        (self.repo_folder(cache, repo_id) / "refs" / "main").write_text(self.commit(repo_id))
        return str(snap)

    def hf_hub_download(self, repo_id: str, filename: str, *, cache_dir=None, local_files_only: bool = False,
                        **_: object) -> str:
        from huggingface_hub import constants, errors

        cache = cache_dir or constants.HF_HUB_CACHE
        self.calls.append({"fn": "hf_hub_download", "repo": repo_id, "file": filename})
        if not local_files_only:
            self._online(repo_id)
            if filename not in self.files(repo_id):
                raise errors.RemoteEntryNotFoundError(f"{filename} not in {repo_id}", response=_response(404, repo_id))
            self._store(cache, repo_id, filename)
        path = self._cached(cache, repo_id) / filename
        if not path.exists():
            raise errors.LocalEntryNotFoundError(f"{filename} of {repo_id} is not cached")
        return str(path)

    def get_safetensors_metadata(self, repo_id: str, *, revision=None, **_: object):
        """Headers of the served safetensors files, as the hub's metadata API returns them."""
        import json
        import struct

        from huggingface_hub import errors
        from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

        self.calls.append({"fn": "get_safetensors_metadata", "repo": repo_id})
        self._online(repo_id)
        root = Path(self.repos[repo_id])
        names = [n for n in self.files(repo_id) if n.endswith(".safetensors") and "/" not in n]
        if not names:
            raise errors.NotASafetensorsRepoError(f"'{repo_id}' is not a safetensors repo")
        files, weight_map = {}, {}
        for name in names:
            with open(root / name, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            meta = header.pop("__metadata__", {}) or {}
            tensors = {k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                       for k, v in header.items()}
            files[name] = SafetensorsFileMetadata(metadata=meta, tensors=tensors)
            weight_map.update({k: name for k in tensors})
        return SafetensorsRepoMetadata(metadata=None, sharded=len(names) > 1, weight_map=weight_map,
                                       files_metadata=files)

    def install(self, monkeypatch) -> "FakeHub":
        """Patch ``huggingface_hub``'s functions (the module attributes :mod:`fuse.hub` calls)."""
        import huggingface_hub

        for fn in ("snapshot_download", "hf_hub_download", "get_safetensors_metadata"):
            monkeypatch.setattr(huggingface_hub, fn, getattr(self, fn))
        return self

    def fetched(self) -> list[str]:
        """Every file name any snapshot_download call copied into the cache."""
        return [f for c in self.calls for f in c.get("fetched", [])]


def copy_as_repo(src: str | Path, dst: str | Path, extra: dict[str, bytes] | None = None) -> Path:
    """Copy a checkpoint dir to ``dst`` and add ``extra`` files (e.g. pickles a repo also holds)."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    for name, data in (extra or {}).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
    return dst


__all__ = ["FakeHub", "copy_as_repo"]
