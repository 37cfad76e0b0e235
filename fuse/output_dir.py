"""Output directories that never cost the user a file: the one mechanism behind every command that writes one.

``fuse merge``, ``fuse demo``, ``fuse toyworld``, the ``analysis`` reports, ``train``'s final model and
``FusedModel.save_pretrained`` all write through :func:`atomic_output_dir`:

1. **Refusal up front** (:func:`check_output`): an existing ``OUT`` needs ``force``, and only a
   *directory* that this toolkit wrote (it holds the :data:`MARKER` file) or an empty directory
   can be replaced. A file, symlink, FIFO, device, socket, the current directory or a directory of
   someone else's is refused with one line, with or without ``force``, before any work.
2. **One writer per OUT**: a lock file ``.OUT.lock`` next to ``OUT`` (``flock``), held until the
   output is in place; a second run to the same ``OUT`` fails at once, naming the first one's pid.
3. **Temp dir + rename**: everything goes to ``.OUT.tmp-<pid>-<start>-<random>`` (the writer's pid
   and process start time are in the name), renamed into place only when complete. The rename
   never replaces anything by accident: ``renameat2(RENAME_NOREPLACE)`` (Linux), and with
   ``force`` an atomic ``RENAME_EXCHANGE`` with the old output, which is then deleted. If
   something appeared at ``OUT`` meanwhile that may not be replaced, nothing is replaced: the
   finished result is kept as ``OUT.new`` (or ``OUT.new-2`` ...) and the run fails with one line.
4. **Faults**: an exception, Ctrl-C or SIGTERM (handled like Ctrl-C while an output is being
   written, see :func:`interrupt_on_sigterm`) removes the temp dir. SIGKILL cannot be caught: the
   next run to the same ``OUT`` removes temp dirs whose process is gone, and says so.
   A full disk or a read-only folder gives one line naming ``OUT`` (never the temp dir).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import CheckpointError

MARKER = ".visionfuse-output"
"""File written into every output directory; ``--force`` replaces only directories that hold it."""
_MARKER_TEXT = json.dumps({"written_by": "visionfuse-toolkit",
                           "note": "--force may replace this whole directory"}, indent=1) + "\n"

Note = Callable[[str], None]


def _stderr_note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (and SIGINT) while :func:`interrupt_on_sigterm` is active."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_defer = {"active": False, "pending": None}  # signal handlers run in the main thread


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise :class:`Interrupted` (a KeyboardInterrupt), so ``finally`` and
    ``except`` blocks clean up on ``kill`` as they do on Ctrl-C. Main thread only; a no-op elsewhere.
    Inside :func:`_deferred_signals` a signal is held back until the critical section ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _defer["active"]:
            _defer["pending"] = signum
            return
        raise Interrupted(signum)

    # only where Python's defaults are in place: an ignored signal stays ignored, a program's own
    # handler stays in charge
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    old = {s: signal.getsignal(s) for s in ours}
    mine = [s for s, default in ours.items() if old[s] is default or old[s] == handler]
    for s in mine:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, old[s])


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back during a few renames (so no half-published state); re-raise after."""
    _defer.update(active=True, pending=None)
    try:
        yield
    finally:
        signum = _defer["pending"]
        _defer.update(active=False, pending=None)
        if signum is not None:
            raise Interrupted(signum)


# ----------------------------------------------------------------------------------------- checks
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def is_own_output(path: str | os.PathLike) -> bool:
    """True for a real directory (not a symlink) that holds :data:`MARKER` (a regular file)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and stat.S_ISREG(os.lstat(Path(path) / MARKER).st_mode)
    except OSError:
        return False


def _not_replaceable(out: Path, st: os.stat_result) -> str | None:
    """Why ``out`` (which exists) may not be replaced, even with ``force``; None if it may."""
    kind = _kind(st.st_mode)
    if kind != "directory":
        return f"is a {kind}"
    try:
        cwd = os.getcwd()
    except OSError:  # the current directory was deleted: it cannot be OUT
        cwd = ""
    if cwd == str(out) or cwd.startswith(str(out).rstrip(os.sep) + os.sep):
        return "is (or contains) the current directory"
    try:
        with os.scandir(out) as it:
            empty = next(it, None) is None
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if empty or is_own_output(out):
        return None
    return "was not written by this toolkit"


def refuse_overlap(out: str | os.PathLike, inputs: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """OUT must not be, contain or sit inside an input (``(label, path)``; None paths are skipped):
    replacing it would delete what the run reads, even when it is an earlier output of this toolkit."""
    o = os.path.realpath(out)  # realpath: a symlink loop is not an exception here
    for label, src in inputs:
        if src is None:
            continue
        s = os.path.realpath(src)
        if o == s or s.startswith(o.rstrip(os.sep) + os.sep) or o.startswith(s.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"{out}: output overlaps the input {label} ({src}); choose another output directory")


def check_output(out: str | os.PathLike, force: bool = False,
                 inputs: Sequence[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Refuse ``out`` unless it is absent, or ``force`` and it is an empty directory or one this toolkit
    wrote; and whatever ``force`` says, if it overlaps one of ``inputs`` (:func:`refuse_overlap`).
    Returns the absolute path (symlinks not resolved: a symlink at OUT is refused, not followed)."""
    refuse_overlap(out, inputs)
    out = Path(os.path.abspath(out))
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise CheckpointError(f"{out}: unusable output path ({e.strerror})") from None
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):  # read-only mount, permissions: say so before any work
        raise CheckpointError(f"{out}: cannot write in {folder} (not writable)")
    if st is None:
        return out
    why = _not_replaceable(out, st)
    if why:
        raise CheckpointError(f"{out}: exists and {why}; choose another output (--force replaces only an empty "
                              f"directory or an output directory this toolkit wrote, marked by {MARKER})")
    if not force:
        raise CheckpointError(f"{out}: output exists (use --force to replace it)")
    return out


# ----------------------------------------------------------------------------------------- renames
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the kernel, libc or filesystem lacks it."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if anything is at ``dst`` (never replaces it)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):  # fallback: check then rename (rename itself never replaces a
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))  # non-empty dir or a file by a dir)
    os.rename(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    return _renameat2(a, b, _RENAME_EXCHANGE)


# ----------------------------------------------------------------------------------------- lock
class _Lock:
    """``flock`` on ``.OUT.lock`` next to OUT; removed on release (re-checked by inode on acquire)."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")
        self.out = out
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CheckpointError(f"{self.out}: another process (pid {owner}) is writing this output; "
                                      "wait for it to finish or choose another output") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------- temp dirs
def _start_stamp(pid: int) -> int | None:
    """The process's start time (centiseconds since the epoch), None if no such process."""
    import psutil

    try:
        return int(round(psutil.Process(pid).create_time() * 100))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return -1  # exists but unreadable (another user's): treat as alive


def _work_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-{_start_stamp(os.getpid())}-"


def sweep_stale(out: Path, note: Note = _stderr_note) -> list[Path]:
    """Remove ``.OUT.tmp-*`` / ``.OUT.old-*`` directories left by processes that no longer run
    (SIGKILL, power loss). Call with the OUT lock held. Returns what was removed."""
    rx = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-(-?\d+)-")
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    for e in entries:
        m = rx.match(e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        pid, stamp = int(m[2]), int(m[3])
        now = _start_stamp(pid)
        if now is not None and (now == -1 or abs(now - stamp) <= 1):
            continue  # that process still runs
        path = Path(e.path)
        shutil.rmtree(path, ignore_errors=True)
        what = "unfinished output" if m[1] == "tmp" else "previous output being replaced"
        if path.exists():
            note(f"could not remove {path} ({what} left by process {pid}, which no longer runs); remove it by hand")
        else:
            note(f"removed {path}: {what} left by process {pid}, which no longer runs (killed?)")
            removed.append(path)
    return removed


def _keep_as_new(tmp: Path, out: Path) -> Path:
    for k in range(1, 1000):
        cand = out.with_name(f"{out.name}.new" + (f"-{k}" if k > 1 else ""))
        try:
            rename_noreplace(tmp, cand)
            return cand
        except FileExistsError:
            continue
    raise CheckpointError(f"{out}: could not keep the finished output ({tmp} left as is)")


def _publish(tmp: Path, out: Path, force: bool, note: Note) -> None:
    """Move the finished ``tmp`` to ``out`` without ever replacing what may not be replaced."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal directory permissions
    with _deferred_signals():
        try:
            rename_noreplace(tmp, out)
            return
        except FileExistsError:
            pass
        try:
            if not force:
                raise CheckpointError(f"{out}: output exists")
            check_output(out, force=True)
        except CheckpointError:
            kept = _keep_as_new(tmp, out)
            raise CheckpointError(f"{out}: something was created there while this run was writing; nothing was "
                                  f"replaced; the finished output is in {kept}") from None
        if _exchange(tmp, out):
            old = tmp
        else:
            old = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "old"), dir=out.parent))
            os.rename(out, old / "x")
            try:
                rename_noreplace(tmp, out)
            except BaseException:
                os.rename(old / "x", out)
                raise
    failed: list[str] = []
    shutil.rmtree(old, onerror=lambda fn, p, exc: failed.append(p))
    if failed:
        note(f"the previous {out} was replaced but could not be fully removed; delete {old} by hand")


def _as_user_error(e: BaseException, tmp: Path, out: Path) -> CheckpointError | None:
    """One line naming OUT (never the temp dir) for an OSError (or a library's disk-full error) raised
    while writing; None for other exceptions (bugs, Ctrl-C, FuseErrors without the temp path)."""
    text = str(e)
    if isinstance(e, CheckpointError):
        return CheckpointError(text.replace(str(tmp), str(out))) if str(tmp) in text else None
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in text \
        or "os error 28" in text  # safetensors' own error type says it this way
    if not (full or isinstance(e, OSError)):
        return None
    name = str(getattr(e, "filename", None) or "")
    if full:
        where = f" while writing {out / Path(name).relative_to(tmp)}" if name.startswith(str(tmp)) else ""
        return CheckpointError(f"{out}: disk full (no space left on device){where}; nothing was written")
    if name.startswith(str(tmp)):
        return CheckpointError(f"{out}: cannot write {out / Path(name).relative_to(tmp)} ({e.strerror or e}); "
                               "nothing was written")
    if name:
        return CheckpointError(f"{name}: {e.strerror or e}; {out} was not written")
    return CheckpointError(f"{out}: write failed ({e.strerror or e}); nothing was written")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, note: Note = _stderr_note) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; move it to ``out`` when the block completes.

    ``out`` must not exist, or (``force``) be an empty directory or one this toolkit wrote
    (:func:`check_output`). On any exception, Ctrl-C or SIGTERM the temp dir is removed and ``out``
    is left as it was. See the module docstring for the lock, the stale-temp sweep and the
    no-replace rename. ``note`` receives one-line notices (default: stderr).
    """
    out = check_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the folder {out.parent} ({e.strerror})") from None
    try:
        lock = _Lock(out).__enter__()
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None
    try:
        check_output(out, force)  # again, now that no other writer can interfere
        sweep_stale(out, note)
        with interrupt_on_sigterm():
            try:
                tmp = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "tmp"), dir=out.parent))
            except OSError as e:
                raise CheckpointError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None
            try:
                (tmp / MARKER).write_text(_MARKER_TEXT)
                yield tmp
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                err = _as_user_error(e, tmp, out)
                if err is not None:
                    raise err from None
                raise
            try:
                _publish(tmp, out, force, note)
            except BaseException as e:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                err = _as_user_error(e, tmp, out) if not isinstance(e, CheckpointError) else None
                if err is not None:
                    raise err from None
                raise
    finally:
        lock.__exit__()


__all__ = ["MARKER", "Interrupted", "atomic_output_dir", "check_output", "interrupt_on_sigterm", "is_own_output",
           "refuse_overlap", "rename_noreplace", "sweep_stale"]
