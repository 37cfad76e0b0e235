"""Hostile-but-fair probes of `fuse`, `train`, `analysis` and the Python API.

Each probe sets up one bad input or fault in a scratch directory, runs the real command (a
subprocess: real signals, real exit codes) or the Python API, and sorts the result into:

- ``clear``: exit code != 0 (or a FuseError from the API), exactly one ``error:`` line, no traceback,
  nothing left behind, the user's files untouched;
- ``ok``: the probe expects success (e.g. ``--force`` over this tool's own output) and got it, with
  the checks the probe names (e.g. a warning was printed);
- ``traceback``: a Python traceback reached the user (or the API raised something other than a
  FuseError);
- ``data_lost``: a file or directory the user owned was deleted, replaced or changed;
- ``wrong``: anything else (a hang, a temp dir left behind, a missing warning, a wrong result).

Usage (about 15 minutes on 2 busy cores; root is needed for the FIFO/device/read-only/disk-full
probes, which are skipped otherwise)::

    python benchmarks/safety_probes.py                  # all probes, summary table
    python benchmarks/safety_probes.py -k force -v      # probes whose name contains "force", with output
    python benchmarks/safety_probes.py --json probes.json

Run it against another checkout with ``PYTHONPATH=/path/to/checkout`` (the scripts ``fuse``,
``train`` and ``analysis`` of this environment then import that checkout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
BIN = Path(sys.executable).parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Run:
    rc: int | None
    out: str
    err: str
    timed_out: bool = False

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Outcome:
    kind: str  # clear | ok | traceback | data_lost | wrong | skipped
    detail: str = ""


@dataclass
class Probe:
    name: str
    area: str
    fn: Callable[["Ctx"], Outcome]


@dataclass
class Ctx:
    root: Path          # shared fixtures (built once)
    scratch: Path       # this probe's own empty directory
    verbose: bool = False
    log: list[str] = field(default_factory=list)

    def run(self, tool: str, *args, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> Run:
        cmd = [str(BIN / tool), *[str(a) for a in args]]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or self.scratch,
                               env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL)
            r = Run(p.returncode, p.stdout, p.stderr)
        except subprocess.TimeoutExpired as e:
            r = Run(None, _s(e.stdout), _s(e.stderr), timed_out=True)
        self.log.append(f"$ {' '.join(cmd)}\n[rc={r.rc}]\n{r.out}{r.err}")
        return r

    def python(self, code: str, timeout: float = 300) -> Run:
        """Run a Python snippet in a fresh process (the Python API as a user's script would)."""
        try:
            p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                               timeout=timeout, cwd=self.scratch, env=ENV, stdin=subprocess.DEVNULL)
            r = Run(p.returncode, p.stdout, p.stderr)
        except subprocess.TimeoutExpired as e:
            r = Run(None, _s(e.stdout), _s(e.stderr), timed_out=True)
        self.log.append(f"$ python -c ...\n[rc={r.rc}]\n{r.out}{r.err}")
        return r


def _s(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def judge(r: Run, expect: str = "error", lost: list[Callable[[], str | None]] = (),
          checks: list[Callable[[], str | None]] = (), contains: tuple[str, ...] = ()) -> Outcome:
    """Sort one run. ``lost``: checks that report a user file changed; ``checks``: other requirements."""
    for c in lost:
        msg = c()
        if msg:
            return Outcome("data_lost", msg)
    if r.timed_out:
        return Outcome("wrong", "hang (timed out)")
    if "Traceback (most recent call last)" in r.text:
        last = [ln for ln in r.text.splitlines() if ln.strip()][-1]
        return Outcome("traceback", last[:200])
    errors = [ln for ln in r.err.splitlines() if ln.startswith(("error:", "Error:"))]  # ours, click's usage errors
    if expect == "any" and r.rc == 0:
        expect = "ok"
    if expect in ("error", "any"):
        if r.rc == 0:
            return Outcome("wrong", "exit 0, expected an error")
        if len(errors) != 1:
            return Outcome("wrong", f"{len(errors)} 'error:' lines: {r.err.strip()[-200:]}")
    elif r.rc != 0:
        return Outcome("wrong", f"exit {r.rc}: {(errors or [r.err.strip()[-200:]])[0]}")
    for s in contains:
        if s not in r.text:
            return Outcome("wrong", f"output lacks {s!r}")
    for c in checks:
        msg = c()
        if msg:
            return Outcome("wrong", msg)
    return Outcome("clear" if expect in ("error", "any") else "ok", (errors or [""])[0][:200])


# ------------------------------------------------------------------------------------ check helpers
def snapshot(path: Path) -> dict[str, bytes | str]:
    """Everything at ``path`` (recursively, without following links): what a user would miss."""
    out: dict[str, bytes | str] = {}
    if not os.path.lexists(path):
        return out
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        out[""] = "link:" + os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        out[""] = "dir"
        for p in sorted(path.rglob("*")):
            rel = str(p.relative_to(path))
            out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else \
                p.read_bytes() if p.is_file() else f"special:{stat.S_IFMT(os.lstat(p).st_mode)}"
    elif stat.S_ISREG(st.st_mode):
        out[""] = path.read_bytes()
    else:
        out[""] = f"special:{stat.S_IFMT(st.st_mode)}:{st.st_rdev}"
    return out


def unchanged(path: Path) -> Callable[[], str | None]:
    """A check that everything at ``path`` now is still there, unchanged (additions are not a loss:
    :func:`no_leftovers` and the probes' own checks catch those)."""
    before = snapshot(path)

    def check() -> str | None:
        after = snapshot(path)
        gone = [k or "(itself)" for k in sorted(before) if k not in after]
        changed = [k or "(itself)" for k in sorted(before) if k in after and after[k] != before[k]]
        if gone:
            return f"{path}: removed {', '.join(gone[:3])}"
        if changed:
            return f"{path}: changed {', '.join(changed[:3])}"
        return None
    return check


def no_leftovers(parent: Path, name: str, allow: tuple[str, ...] = ()) -> Callable[[], str | None]:
    """No ``.NAME.tmp-*`` / ``.NAME.old-*`` / lock files of this tool left next to ``NAME``."""
    def check() -> str | None:
        left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name not in allow]
        return f"left behind: {', '.join(left)}" if left else None
    return check


def absent(path: Path) -> Callable[[], str | None]:
    return lambda: f"{path} exists" if os.path.lexists(path) else None


def loads_fused(path: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        if not (path / "fuse_config.json").is_file() or not (path / "llm" / "config.json").is_file():
            return f"{path}: not a complete fused model"
        return None
    return check


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("years of work\n")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "results.csv").write_text("a,b\n1,2\n")
    return path


@contextlib.contextmanager
def read_only_dir(path: Path):
    """``path`` made read-only: a read-only bind mount as root (root ignores mode bits), chmod otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if IS_ROOT:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tiny tmpfs at ``path`` (root only): writes beyond ``size`` fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def needs_root() -> Outcome | None:
    return None if IS_ROOT else Outcome("skipped", "needs root")


def wait_for(cond: Callable[[], bool], timeout: float = 120, step: float = 0.005) -> bool:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if cond():
            return True
        time.sleep(step)
    return False


def tmp_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.glob(f".{name}.tmp-*")]


def popen(ctx: Ctx, tool: str, *args) -> subprocess.Popen:
    cmd = [str(BIN / tool), *[str(a) for a in args]]
    ctx.log.append(f"$ {' '.join(cmd)} (background)")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ctx.scratch,
                            env=ENV, stdin=subprocess.DEVNULL)


def finish(ctx: Ctx, p: subprocess.Popen, timeout: float = 300) -> Run:
    try:
        out, err = p.communicate(timeout=timeout)
        r = Run(p.returncode, out, err)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        r = Run(None, out, err, timed_out=True)
    ctx.log.append(f"[rc={r.rc}]\n{r.out}{r.err}")
    return r


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` pixels (the data is a stub): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------- fixtures
def build_fixtures(root: Path) -> None:
    """Tiny family (base + llava-hf member + original-layout member), a bigger family for timing
    probes, a recipe for each, one fused output, images, a toy training setup."""
    import torch
    import yaml

    from fuse.testing import build_base_llm, build_llava_hf_member, build_llava_member, random_image

    fam = root / "fam"
    base = build_base_llm(fam / "base", seed=0)
    build_llava_hf_member(fam / "a", base, seed=1)
    build_llava_member(fam / "b", base, seed=2)
    big = root / "big"
    over = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8}
    bbase = build_base_llm(big / "base", seed=0, **over)
    build_llava_hf_member(big / "a", bbase, seed=1)
    build_llava_hf_member(big / "c", bbase, seed=3)
    for name, d, members in (("recipe.yaml", fam, ("a", "b")), ("big.yaml", big, ("a", "c"))):
        (root / name).write_text(yaml.safe_dump({
            "base_model": str(d / "base"), "members": [{"model": str(d / m)} for m in members],
            "text": {"member": members[0]}, "output": {"dir": str(root / "unused-out")}}))
    imgs = root / "images"
    imgs.mkdir()
    for i in range(4):
        random_image(i, (56, 56)).save(imgs / f"{i}.png")
    env = {**ENV}
    subprocess.run([str(BIN / "fuse"), "merge", str(root / "recipe.yaml"), "-o", str(root / "fused"), "-q",
                    "--no-checksums"], check=True, env=env, capture_output=True)
    from train.toy import toy_config, write_toy_dataset

    write_toy_dataset(root / "toy" / "data")
    cfg = toy_config(base, root / "toy" / "data" / "data.json", root / "toy" / "data" / "images",
                     root / "toy" / "run", max_steps=2, save_every=1)
    (root / "toy" / "stage1.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([str(BIN / "train"), "comm", "-c", str(root / "toy" / "stage1.yaml")], check=True, env=env,
                   capture_output=True)
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------- probes
PROBES: list[Probe] = []


def probe(area: str, name: str):
    def deco(fn):
        PROBES.append(Probe(name, area, fn))
        return fn
    return deco


def merge_args(ctx: Ctx, out: Path, *extra, recipe: str = "recipe.yaml"):
    return ("merge", ctx.root / recipe, "-o", out, "-q", "--no-checksums", *extra)


def fresh_fused(ctx: Ctx, out: Path) -> Path:
    shutil.copytree(ctx.root / "fused", out, symlinks=True)
    return out


# -- output directory: merge --------------------------------------------------------------------------
@probe("output", "merge: new OUT is written")
def _(ctx):
    out = ctx.scratch / "out"
    r = ctx.run("fuse", *merge_args(ctx, out))
    return judge(r, "ok", checks=[loads_fused(out), no_leftovers(ctx.scratch, "out")])


@probe("output", "merge: existing user dir without --force")
def _(ctx):
    out = user_dir(ctx.scratch / "out")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out)), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "out")])


@probe("output", "merge --force: user dir not written by fuse")
def _(ctx):
    out = user_dir(ctx.scratch / "out")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force")), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "out")])


@probe("output", "merge --force: over an earlier merge output")
def _(ctx):
    out = fresh_fused(ctx, ctx.scratch / "out")
    r = ctx.run("fuse", *merge_args(ctx, out, "--force"))
    return judge(r, "ok", checks=[loads_fused(out), no_leftovers(ctx.scratch, "out")])


@probe("output", "merge --force: over an empty dir")
def _(ctx):
    out = ctx.scratch / "out"
    out.mkdir()
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force")), "ok", checks=[loads_fused(out)])


@probe("output", "merge --force: OUT is a regular file")
def _(ctx):
    out = ctx.scratch / "out"
    out.write_text("my notes\n")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force")), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "out")])


@probe("output", "merge --force: OUT is a symlink to a user dir")
def _(ctx):
    target = user_dir(ctx.scratch / "precious")
    out = ctx.scratch / "out"
    out.symlink_to(target)
    keep = [unchanged(out), unchanged(target)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force")), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "out")])


@probe("output", "merge --force: OUT is a FIFO")
def _(ctx):
    out = ctx.scratch / "out"
    os.mkfifo(out)
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force"), timeout=120), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "out")])


@probe("output", "merge --force: OUT is a character device (like /dev/null)")
def _(ctx):
    if (s := needs_root()):
        return s
    out = ctx.scratch / "null"
    os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force")), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "null")])


@probe("output", "merge --force: recipe output.dir is a file")
def _(ctx):
    import yaml

    out = ctx.scratch / "notes.txt"
    out.write_text("mine\n")
    data = yaml.safe_load((ctx.root / "recipe.yaml").read_text())
    data["output"]["dir"] = str(out)
    rec = ctx.scratch / "r.yaml"
    rec.write_text(yaml.safe_dump(data))
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", "merge", rec, "--force", "-q", "--no-checksums"), lost=keep,
                 checks=[no_leftovers(ctx.scratch, "notes.txt")])


@probe("output", "merge --force: OUT is the current directory")
def _(ctx):
    here = user_dir(ctx.scratch / "work")
    keep = [unchanged(here)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, Path("."), "--force"), cwd=here), lost=keep)


@probe("output", "merge: a directory created at OUT while the merge runs")
def _(ctx):
    out = ctx.scratch / "out"
    p = popen(ctx, "fuse", *merge_args(ctx, out, recipe="big.yaml"))
    if not wait_for(lambda: bool(tmp_dirs(ctx.scratch, "out")) or p.poll() is not None):
        p.kill()
        return Outcome("wrong", "merge never started writing")
    if p.poll() is not None:
        return Outcome("skipped", "merge finished before the directory could be created")
    user_dir(out)
    check = unchanged(out)
    r = finish(ctx, p)
    return judge(r, lost=[check], checks=[no_leftovers(ctx.scratch, "out")])


@probe("output", "merge: two merges to one new OUT at once")
def _(ctx):
    out = ctx.scratch / "out"
    p1 = popen(ctx, "fuse", *merge_args(ctx, out, recipe="big.yaml"))
    p2 = popen(ctx, "fuse", *merge_args(ctx, out, recipe="big.yaml"))
    r1, r2 = finish(ctx, p1), finish(ctx, p2)
    if any("Traceback" in r.text for r in (r1, r2)):
        return Outcome("traceback", "")
    oks = [r for r in (r1, r2) if r.rc == 0]
    if len(oks) != 1:
        return Outcome("data_lost" if len(oks) == 2 else "wrong",
                       "both merges reported success: the first result was replaced" if len(oks) == 2 else
                       "neither merge succeeded")
    bad = r2 if oks[0] is r1 else r1
    return judge(bad, checks=[loads_fused(out), no_leftovers(ctx.scratch, "out")])


def _signal_probe(ctx: Ctx, sig: int, expect_rc: int) -> Outcome:
    out = ctx.scratch / "out"
    p = popen(ctx, "fuse", *merge_args(ctx, out, recipe="big.yaml"))
    if not wait_for(lambda: any((d / "llm").exists() for d in tmp_dirs(ctx.scratch, "out")) or p.poll() is not None):
        p.kill()
        return Outcome("wrong", "merge never started writing")
    if p.poll() is not None:
        return Outcome("skipped", "merge finished before the signal")
    p.send_signal(sig)
    r = finish(ctx, p, timeout=60)
    if "Traceback" in r.text:
        return Outcome("traceback", r.err.strip().splitlines()[-1][:200])
    if r.rc != expect_rc:
        return Outcome("wrong", f"exit {r.rc} (expected {expect_rc})")
    left = tmp_dirs(ctx.scratch, "out")
    if left or out.exists():
        return Outcome("wrong", f"left behind: {', '.join(p.name for p in left) or out}")
    return Outcome("clear", r.err.strip().splitlines()[-1] if r.err.strip() else "")


@probe("signals", "merge: Ctrl-C (SIGINT) while writing")
def _(ctx):
    return _signal_probe(ctx, signal.SIGINT, 130)


@probe("signals", "merge: SIGTERM while writing")
def _(ctx):
    return _signal_probe(ctx, signal.SIGTERM, 143)


@probe("signals", "merge: SIGKILL while writing, then the next run")
def _(ctx):
    out = ctx.scratch / "out"
    p = popen(ctx, "fuse", *merge_args(ctx, out, recipe="big.yaml"))
    if not wait_for(lambda: any((d / "llm").exists() for d in tmp_dirs(ctx.scratch, "out")) or p.poll() is not None):
        p.kill()
        return Outcome("wrong", "merge never started writing")
    if p.poll() is not None:
        return Outcome("skipped", "merge finished before the signal")
    p.kill()
    p.wait()
    stale = tmp_dirs(ctx.scratch, "out")
    r = ctx.run("fuse", *merge_args(ctx, out))
    if "Traceback" in r.text:
        return Outcome("traceback", "")
    if r.rc != 0:
        return Outcome("wrong", f"next run failed: {r.err.strip()[-200:]}")
    if tmp_dirs(ctx.scratch, "out"):
        left = ", ".join(p.name for p in tmp_dirs(ctx.scratch, "out"))
        return Outcome("wrong", f"stale temp dir still there: {left}")
    if stale and not any(s.name in r.text for s in stale):
        return Outcome("wrong", "stale temp dir removed without saying so")
    return Outcome("ok", "stale temp dir removed and reported")


@probe("output", "merge: read-only output parent")
def _(ctx):
    parent = ctx.scratch / "ro"
    with read_only_dir(parent):
        r = ctx.run("fuse", *merge_args(ctx, parent / "out"))
    return judge(r)


@probe("output", "merge --force: earlier output in a read-only parent")
def _(ctx):
    parent = ctx.scratch / "ro"
    out = fresh_fused(ctx, parent / "out")
    keep = unchanged(out)
    with read_only_dir(parent):
        r = ctx.run("fuse", *merge_args(ctx, out, "--force"))
    return judge(r, lost=[keep])


@probe("output", "merge: OUT is a symlink loop")
def _(ctx):
    out = ctx.scratch / "loop"
    out.symlink_to("loop")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out)), lost=keep)


@probe("output", "merge --force: OUT is a symlink loop")
def _(ctx):
    out = ctx.scratch / "loop"
    out.symlink_to("loop")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, out, "--force")), lost=keep)


@probe("output", "merge: OUT inside a symlink loop")
def _(ctx):
    loop = ctx.scratch / "loop"
    loop.symlink_to("loop")
    return judge(ctx.run("fuse", *merge_args(ctx, loop / "out")))


@probe("output", "merge: OUT's parent is a file")
def _(ctx):
    f = ctx.scratch / "file"
    f.write_text("x")
    keep = [unchanged(f)]  # before the run
    return judge(ctx.run("fuse", *merge_args(ctx, f / "out")), lost=keep)


@probe("output", "merge: disk full")
def _(ctx):
    if (s := needs_root()):
        return s
    disk = ctx.scratch / "disk"
    with small_disk(disk, "300k"):
        r = ctx.run("fuse", *merge_args(ctx, disk / "out"))
        res = judge(r, contains=(str(disk / "out"), "disk full"), checks=[no_leftovers(disk, "out"),
                                                                          absent(disk / "out")])
        if res.kind == "clear" and ".tmp-" in r.err:
            res = Outcome("wrong", f"message names the temp dir: {r.err.strip()}")
    return res


# -- output directory: other commands -------------------------------------------------------------------
@probe("output", "demo --force: user dir")
def _(ctx):
    out = user_dir(ctx.scratch / "demo")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", "demo", "-o", out, "--force"), lost=keep)


@probe("output", "demo: read-only parent")
def _(ctx):
    parent = ctx.scratch / "ro"
    with read_only_dir(parent):
        return judge(ctx.run("fuse", "demo", "-o", parent / "demo"))


@probe("output", "demo: disk full")
def _(ctx):
    if (s := needs_root()):
        return s
    disk = ctx.scratch / "disk"
    with small_disk(disk, "200k"):
        r = ctx.run("fuse", "demo", "-o", disk / "demo")
        res = judge(r, contains=(str(disk / "demo"),), checks=[no_leftovers(disk, "demo"), absent(disk / "demo")])
        if res.kind == "clear" and ".tmp-" in r.err:
            res = Outcome("wrong", f"message names the temp dir: {r.err.strip()}")
    return res


@probe("wrong_result", "demo: member_b loads in a fresh process with its real tower config")
def _(ctx):
    out = ctx.scratch / "demo"
    r = ctx.run("fuse", "demo", "-o", out)
    if r.rc != 0:
        return judge(r, "ok")
    r2 = ctx.python(f"""
        import warnings, json
        warnings.simplefilter("error", UserWarning)
        from pathlib import Path
        from fuse.members import load_member
        cfg = json.loads(Path({str(out / 'member_b' / 'config.json')!r}).read_text())
        assert Path(cfg["mm_vision_tower"]).is_dir(), "mm_vision_tower: " + cfg["mm_vision_tower"]
        m = load_member({str(out / 'member_b')!r})
        heads = m.vision.encoder.model.config.num_attention_heads
        assert heads == 4, heads
        print("ok")
    """)
    return judge(r2, "ok", contains=("ok",))


@probe("output", "analysis align --force: user dir")
def _(ctx):
    out = user_dir(ctx.scratch / "rep")
    keep = [unchanged(out)]  # before the run
    r = ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", ctx.root / "images", "--n", 2,
                "--workers", 0, "-q", "-o", out, "--force")
    return judge(r, lost=keep)


@probe("output", "analysis align: read-only parent")
def _(ctx):
    parent = ctx.scratch / "ro"
    with read_only_dir(parent):
        r = ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", ctx.root / "images", "--n", 2,
                    "--workers", 0, "-q", "-o", parent / "rep")
    return judge(r)


@probe("output", "analysis align: output symlink loop")
def _(ctx):
    out = ctx.scratch / "loop"
    out.symlink_to("loop")
    keep = [unchanged(out)]  # before the run
    r = ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", ctx.root / "images", "--n", 2,
                "--workers", 0, "-q", "-o", out, "--force")
    return judge(r, lost=keep)


@probe("output", "toyworld generate --force: user dir")
def _(ctx):
    out = user_dir(ctx.scratch / "toy")
    keep = [unchanged(out)]  # before the run
    return judge(ctx.run("fuse", "toyworld", "generate", "-o", out, "--n-train", 4, "--n-test", 4, "--force"),
                 lost=keep)


@probe("output", "toyworld compare -o DIR: DIR/test and DIR/fused-* hold user files")
def _(ctx):
    out = ctx.scratch / "cmp"
    user_dir(out / "test")
    user_dir(out / "fused-linear")
    keep = unchanged(out)
    r = ctx.run("fuse", "toyworld", "compare", "-o", out, "--limit", 2, "--methods", "linear", "--budget", "none",
                timeout=600)
    return judge(r, lost=[keep])


@probe("output", "save_pretrained: into a dir holding other files")
def _(ctx):
    out = user_dir(ctx.scratch / "mine")
    before = snapshot(out)
    r = ctx.python(f"""
        import fuse
        from fuse.errors import FuseError
        m = fuse.load({str(ctx.root / 'fused')!r})
        try:
            m.save_pretrained({str(out)!r})
        except FuseError as e:
            print("refused:", e)
        else:
            print("saved")
    """)
    if "Traceback" in r.text:
        return Outcome("traceback", r.err.strip().splitlines()[-1])
    after = snapshot(out)
    if any(after.get(k) != v for k, v in before.items()):
        return Outcome("data_lost", "user files removed or changed")
    if "saved" in r.out and not (out / "fuse_config.json").is_file():
        return Outcome("wrong", "saved but no fused model written")
    return Outcome("clear" if "refused" in r.out else "ok", r.out.strip())


@probe("output", "save_pretrained: onto a regular file")
def _(ctx):
    f = ctx.scratch / "model"
    f.write_text("mine\n")
    keep = [unchanged(f)]  # before the run
    r = ctx.python(f"""
        import fuse
        from fuse.errors import FuseError
        m = fuse.load({str(ctx.root / 'fused')!r})
        try:
            m.save_pretrained({str(f)!r})
        except FuseError as e:
            print("error:", e)
            raise SystemExit(2)
    """)
    return judge(Run(r.rc, r.out, r.out + r.err, r.timed_out), lost=keep)


@probe("output", "save_pretrained: a fused model saved and reloaded")
def _(ctx):
    out = ctx.scratch / "saved"
    r = ctx.python(f"""
        import fuse
        m = fuse.load({str(ctx.root / 'fused')!r})
        m.save_pretrained({str(out)!r})
        m.save_pretrained({str(out)!r})  # again: replaces its own earlier save
        fuse.load({str(out)!r})
        print("ok")
    """)
    return judge(r, "ok", contains=("ok",), checks=[no_leftovers(ctx.scratch, "saved")])


@probe("output", "train: output dir in a read-only parent")
def _(ctx):
    parent = ctx.scratch / "ro"
    with read_only_dir(parent):
        r = ctx.run("train", "comm", "-c", ctx.root / "toy" / "stage1.yaml", "-o", parent / "run", "--max-steps", 1)
    return judge(r)


# -- training checkpoints ---------------------------------------------------------------------------
def _broken_run(ctx: Ctx, edit: Callable[[Path], None]) -> Path:
    """A copy of the 2-step fixture run whose last checkpoint is step 1 (step 2 removed), edited."""
    run = ctx.scratch / "run"
    shutil.copytree(ctx.root / "toy" / "run", run)
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    for c in ckpts[1:]:
        shutil.rmtree(c)
    shutil.rmtree(run / "final", ignore_errors=True)
    edit(ckpts[0] / "accelerate")
    return run


def _resume(ctx: Ctx, run: Path) -> Run:
    return ctx.run("train", "comm", "-c", ctx.root / "toy" / "stage1.yaml", "-o", run, "--resume", "auto")


@probe("train", "resume: intact checkpoint (control)")
def _(ctx):
    return judge(_resume(ctx, _broken_run(ctx, lambda d: None)), "ok")


@probe("train", "resume: truncated model.safetensors")
def _(ctx):
    def edit(d):
        f = d / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)
    return judge(_resume(ctx, _broken_run(ctx, edit)))


@probe("train", "resume: truncated optimizer.bin")
def _(ctx):
    def edit(d):
        f = d / "optimizer.bin"
        os.truncate(f, f.stat().st_size // 2)
    return judge(_resume(ctx, _broken_run(ctx, edit)))


def _malicious_pickle(path: Path, marker: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path.write_bytes(pickle.dumps(Evil()))


@probe("train", "resume: malicious pickle as optimizer.bin")
def _(ctx):
    marker = ctx.scratch / "pwned"
    run = _broken_run(ctx, lambda d: _malicious_pickle(d / "optimizer.bin", marker))
    res = judge(_resume(ctx, run))
    return Outcome("data_lost", "the pickle ran code") if marker.exists() else res


@probe("train", "resume: truncated random_states_0.pkl")
def _(ctx):
    def edit(d):
        f = d / "random_states_0.pkl"
        os.truncate(f, f.stat().st_size // 2)
    return judge(_resume(ctx, _broken_run(ctx, edit)))


@probe("train", "resume: malicious pickle as random_states_0.pkl")
def _(ctx):
    marker = ctx.scratch / "pwned"
    run = _broken_run(ctx, lambda d: _malicious_pickle(d / "random_states_0.pkl", marker))
    res = judge(_resume(ctx, run))
    return Outcome("data_lost", "the pickle ran code") if marker.exists() else res


@probe("train", "seed 10^29")
def _(ctx):
    return judge(ctx.run("train", "comm", "-c", ctx.root / "toy" / "stage1.yaml", "-o", ctx.scratch / "run",
                         "--set", "seed=100000000000000000000000000000", "--max-steps", 1))


# -- faults: NaN/Inf ----------------------------------------------------------------------------------
def _nan_member(ctx: Ctx, key_part: str) -> Path:
    from fuse.checkpoint import LazyCheckpoint, ShardedWriter

    src = ctx.root / "fam" / "b"
    dst = ctx.scratch / "nanmember"
    shutil.copytree(src, dst)
    sd = LazyCheckpoint(dst).state_dict()
    key = next(k for k in sd if key_part in k)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    w = ShardedWriter(dst)
    for k, v in sd.items():
        w.add(k, v)
    w.close()
    return dst


def _recipe_with(ctx: Ctx, members: list, **over) -> Path:
    import yaml

    data = yaml.safe_load((ctx.root / "recipe.yaml").read_text())
    data["members"] = [m if isinstance(m, dict) else {"model": str(m)} for m in members]
    data["text"] = {"member": over.pop("text_member", None)} if "text_member" in over else data.get("text")
    data["output"] = {"dir": str(ctx.scratch / "out")}
    data.update(over)
    p = ctx.scratch / "r.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return p


@probe("faults", "merge: NaN in a member's vision weights")
def _(ctx):
    bad = _nan_member(ctx, "mm_projector.0.weight")
    rec = _recipe_with(ctx, [ctx.root / "fam" / "a", bad], text_member="a")
    r = ctx.run("fuse", "merge", rec, "-q", "--no-checksums")
    return judge(r, checks=[absent(ctx.scratch / "out")])


@probe("faults", "generate: a fused model whose vision weights hold NaN")
def _(ctx):
    from safetensors.torch import load_file, save_file

    out = fresh_fused(ctx, ctx.scratch / "fused")
    f = out / "members" / "b" / "vision.safetensors"
    sd = load_file(str(f))
    k = next(k for k in sd if "mm_projector.0.weight" in k)
    sd[k].view(-1)[:] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    r = ctx.run("fuse", "generate", out, "--image", ctx.root / "images" / "0.png", "--prompt", "<image>\nWhat?",
                "--max-new-tokens", 4)
    return judge(r)


# -- wrong results without an error ---------------------------------------------------------------------
@probe("wrong_result", "merge: member path ending in /..")
def _(ctx):
    b = ctx.scratch / "b"
    shutil.copytree(ctx.root / "fam" / "b", b)
    (b / "sub").mkdir()
    rec = _recipe_with(ctx, [ctx.root / "fam" / "a", f"{b}/sub/.."], text_member="a")
    r = ctx.run("fuse", "merge", rec, "-q", "--no-checksums")
    out = ctx.scratch / "out"
    if r.rc == 0:
        r2 = ctx.python(f"import fuse; m = fuse.load({str(out)!r}); print(m.member_names)")
        bad = [p.name for p in out.iterdir() if p.name not in ("llm", "members", "fuse_config.json", "config.json",
                                                             "README.md") and not p.name.startswith(".")]
        if r2.rc != 0 or bad:
            return Outcome("wrong", f"output unusable ({'stray ' + ', '.join(bad) if bad else r2.err[-150:]})")
        return judge(r2, "ok")
    return judge(r)


@probe("wrong_result", "check: invalid inference section")
def _(ctx):
    rec = _recipe_with(ctx, [ctx.root / "fam" / "a", ctx.root / "fam" / "b"], text_member="a",
                       inference={"token_budget": "squash:3"})
    return judge(ctx.run("fuse", "check", rec), contains=("inference",))


@probe("wrong_result", "merge: YAML alias bomb in the inference section")
def _(ctx):
    base = (ctx.root / "recipe.yaml").read_text()
    bomb = "inference:\n  x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        bomb += f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n"
    text = "\n".join(ln for ln in base.splitlines() if not ln.startswith("inference")) + "\n" + bomb
    text = text.replace(str(ctx.root / "unused-out"), str(ctx.scratch / "out"))
    rec = ctx.scratch / "bomb.yaml"
    rec.write_text(text)
    t = time.perf_counter()
    r = ctx.run("fuse", "merge", rec, "-q", "--no-checksums", timeout=120)
    res = judge(r, checks=[absent(ctx.scratch / "out")])
    if res.kind == "clear" and time.perf_counter() - t > 60:
        return Outcome("wrong", "took over 60 s to fail")
    return res


@probe("wrong_result", "merge: members with different dtypes")
def _(ctx):
    from fuse.checkpoint import LazyCheckpoint, ShardedWriter

    import torch

    half = ctx.scratch / "b16"
    shutil.copytree(ctx.root / "fam" / "b", half)
    sd = LazyCheckpoint(half).state_dict()
    for f in half.glob("*.safetensors*"):
        f.unlink()
    w = ShardedWriter(half)
    for k, v in sd.items():
        w.add(k, v.to(torch.bfloat16))
    w.close()
    rec = _recipe_with(ctx, [ctx.root / "fam" / "a", half], text_member="a")
    r = ctx.run("fuse", "merge", rec, "-q", "--no-checksums")
    return judge(r, "ok", contains=("dtype",))


# -- merge inputs -------------------------------------------------------------------------------------------
@probe("inputs", "merge: member config.json without hidden_size")
def _(ctx):
    m = ctx.scratch / "nohidden"
    shutil.copytree(ctx.root / "fam" / "a", m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["text_config"].pop("hidden_size", None)
    (m / "config.json").write_text(json.dumps(cfg))
    rec = _recipe_with(ctx, [ctx.root / "fam" / "b", m], text_member="b")
    r = ctx.run("fuse", "merge", rec, "-q", "--no-checksums")
    res = judge(r, contains=("hidden_size",))
    if res.kind == "clear" and "4096" in r.err:
        return Outcome("wrong", f"misleading: {r.err.strip()}")
    return res


@probe("inputs", "inspect: index names a shard outside the checkpoint (../x.safetensors)")
def _(ctx):
    from safetensors.torch import save_file

    from fuse.checkpoint import LazyCheckpoint

    m = ctx.scratch / "m"
    shutil.copytree(ctx.root / "fam" / "a", m)
    sd = LazyCheckpoint(m).state_dict()
    head = "language_model.lm_head.weight"
    save_file({head: sd.pop(head)}, str(ctx.scratch / "x.safetensors"))  # outside the member folder
    save_file(sd, str(m / "model.safetensors"))
    wm = {k: "model.safetensors" for k in sd}
    wm[head] = "../x.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return judge(ctx.run("fuse", "inspect", m), contains=("x.safetensors",))


@probe("inputs", "inspect: index names an absolute shard path")
def _(ctx):
    m = ctx.scratch / "m"
    shutil.copytree(ctx.root / "fam" / "a", m)
    from fuse.checkpoint import LazyCheckpoint

    wm = {k: str(m / "model.safetensors") for k in LazyCheckpoint(m).keys()}
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return judge(ctx.run("fuse", "inspect", m))


@probe("inputs", "inspect: mm_vision_tower is a .bin-only folder")
def _(ctx):
    import torch

    m = ctx.scratch / "m"
    shutil.copytree(ctx.root / "fam" / "b", m)
    tower = ctx.scratch / "tower_bin"
    tower.mkdir()
    src = Path(json.loads((m / "config.json").read_text())["mm_vision_tower"])
    shutil.copy(src / "config.json", tower / "config.json")
    shutil.copy(src / "preprocessor_config.json", tower / "preprocessor_config.json")
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), tower / "pytorch_model.bin")
    from fuse.checkpoint import LazyCheckpoint, ShardedWriter

    sd = {k: v for k, v in LazyCheckpoint(m).state_dict().items() if not k.startswith("model.vision_tower.")}
    for f in m.glob("*.safetensors*"):
        f.unlink()
    w = ShardedWriter(m)
    for k, v in sd.items():
        w.add(k, v)
    w.close()
    cfg = json.loads((m / "config.json").read_text())
    cfg["mm_vision_tower"] = str(tower)
    (m / "config.json").write_text(json.dumps(cfg))
    r = ctx.python(f"""
        import sys
        from fuse.errors import FuseError
        from fuse.members import load_member
        try:
            load_member({str(m)!r})
        except FuseError as e:
            print("error:", e, file=sys.stderr)
            raise SystemExit(2)
    """)
    return judge(r, contains=("safetensors",))


@probe("inputs", "merge: recipe alias bomb in members")
def _(ctx):
    text = "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        text += f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n"
    text += "members: *a8\n"
    rec = ctx.scratch / "bomb.yaml"
    rec.write_text(text)
    return judge(ctx.run("fuse", "check", rec, timeout=120))


@probe("inputs", "generate: on a member dir instead of a fused dir")
def _(ctx):
    r = ctx.run("fuse", "generate", ctx.root / "fam" / "a", "--image", ctx.root / "images" / "0.png", "--prompt", "hi")
    res = judge(r)
    if res.kind == "clear" and "not a fused model" not in r.err:
        return Outcome("wrong", f"misleading: {r.err.strip()}")
    return res


# -- CLI options --------------------------------------------------------------------------------------------
def _gen(ctx: Ctx, *extra) -> Run:
    return ctx.run("fuse", "generate", ctx.root / "fused", "--image", ctx.root / "images" / "0.png", "--prompt",
                   "<image>\nWhat?", "--max-new-tokens", 2, *extra)


@probe("options", "generate --device cuda on a CPU build")
def _(ctx):
    import torch

    if torch.cuda.is_available():
        return Outcome("skipped", "CUDA is available here")
    return judge(_gen(ctx, "--device", "cuda"))


@probe("options", "generate --device nonsense")
def _(ctx):
    return judge(_gen(ctx, "--device", "tpu9"))


@probe("options", "eval --device cuda on a CPU build")
def _(ctx):
    import torch

    if torch.cuda.is_available():
        return Outcome("skipped", "CUDA is available here")
    data = ctx.scratch / "q.jsonl"
    data.write_text(json.dumps({"question": "colour?", "image": str(ctx.root / "images" / "0.png"),
                                "answers": ["red"]}) + "\n")
    return judge(ctx.run("fuse", "eval", ctx.root / "fused", "--task", "vqa", "--data", data, "--device", "cuda"))


@probe("options", "analysis --device cuda on a CPU build")
def _(ctx):
    import torch

    if torch.cuda.is_available():
        return Outcome("skipped", "CUDA is available here")
    return judge(ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", ctx.root / "images", "--n", 2,
                         "--workers", 0, "-q", "-o", ctx.scratch / "rep", "--device", "cuda"))


@probe("options", "generate --sample --temperature 0")
def _(ctx):
    return judge(_gen(ctx, "--sample", "--temperature", 0))


@probe("options", "generate --sample --top-p 1.5")
def _(ctx):
    return judge(_gen(ctx, "--sample", "--top-p", 1.5))


@probe("options", "generate --seed 10^29")
def _(ctx):
    return judge(_gen(ctx, "--sample", "--seed", 10 ** 29))


@probe("options", "generate --dtype int8")
def _(ctx):
    return judge(_gen(ctx, "--dtype", "int8"))


@probe("options", "analysis align --seed 10^29")
def _(ctx):
    return judge(ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", ctx.root / "images", "--n", 2,
                         "--workers", 0, "-q", "-o", ctx.scratch / "rep", "--seed", 10 ** 29))


@probe("options", "analysis align --seed -1")
def _(ctx):
    return judge(ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", ctx.root / "images", "--n", 2,
                         "--workers", 0, "-q", "-o", ctx.scratch / "rep", "--seed", -1), "any")


@probe("options", "toyworld generate --seed 10^29")
def _(ctx):
    return judge(ctx.run("fuse", "toyworld", "generate", "-o", ctx.scratch / "toy", "--n-train", 4, "--n-test", 4,
                         "--seed", 10 ** 29), "any")


@probe("inputs", "analysis: a 225-megapixel PNG among the images")
def _(ctx):
    imgs = ctx.scratch / "imgs"
    shutil.copytree(ctx.root / "images", imgs)
    png_header_only(imgs / "huge.png", 15000, 15000)
    out = ctx.scratch / "rep"
    r = ctx.run("analysis", "align", ctx.root / "recipe.yaml", "--images", imgs, "--n", 5, "--workers", 0, "-q",
                "-o", out)
    res = judge(r, "ok")
    if res.kind == "ok":
        rep = (out / "report.md").read_text() if (out / "report.md").is_file() else ""
        if "huge.png" not in rep + r.err:
            return Outcome("wrong", "the skipped image is not reported")
    return res


@probe("inputs", "generate: a 225-megapixel PNG")
def _(ctx):
    img = png_header_only(ctx.scratch / "huge.png", 15000, 15000)
    return judge(ctx.run("fuse", "generate", ctx.root / "fused", "--image", img, "--prompt", "hi"))


# -- more: outputs over inputs, odd structure ------------------------------------------------------------------
@probe("output", "analysis align --force: -o is the fused model it reads")
def _(ctx):
    fused = fresh_fused(ctx, ctx.scratch / "fused")
    keep = unchanged(fused)
    r = ctx.run("analysis", "align", fused, "--images", ctx.root / "images", "--n", 2, "--workers", 0, "-q",
                "-o", fused, "--force")
    return judge(r, lost=[keep])


@probe("output", "merge: -o inside a member dir")
def _(ctx):
    b = ctx.scratch / "b"
    shutil.copytree(ctx.root / "fam" / "b", b)
    keep = unchanged(b)
    rec = _recipe_with(ctx, [ctx.root / "fam" / "a", b], text_member="a")
    return judge(ctx.run("fuse", "merge", rec, "-o", b / "fused", "-q", "--no-checksums"), lost=[keep])


@probe("train", "stage 2 --from RUN/final -o RUN --force")
def _(ctx):
    run = ctx.scratch / "run"
    shutil.copytree(ctx.root / "toy" / "run", run)
    keep = unchanged(run / "final")
    r = ctx.run("train", "comm", "--stage", 2, "-c", ctx.root / "toy" / "stage1.yaml", "--from", run / "final",
                "-o", run, "--force")
    return judge(r, lost=[keep])


@probe("inputs", "generate: --image is a directory")
def _(ctx):
    return judge(ctx.run("fuse", "generate", ctx.root / "fused", "--image", ctx.root / "images", "--prompt", "hi"))


@probe("inputs", "check: recursive YAML alias")
def _(ctx):
    rec = ctx.scratch / "loop.yaml"
    rec.write_text((ctx.root / "recipe.yaml").read_text() + "inference: &x {token_budget: *x}\n")
    return judge(ctx.run("fuse", "check", rec, timeout=120))


@probe("inputs", "inspect: index weight_map value is a list")
def _(ctx):
    m = ctx.scratch / "m"
    shutil.copytree(ctx.root / "fam" / "a", m)
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": ["model.safetensors"]}}))
    return judge(ctx.run("fuse", "inspect", m))


@probe("inputs", "generate: fuse_config names a member dir outside the fused dir")
def _(ctx):
    fused = fresh_fused(ctx, ctx.scratch / "fused")
    cfg = json.loads((fused / "fuse_config.json").read_text())
    cfg["members"][1]["dir"] = str(ctx.root / "fused" / "members" / cfg["members"][1]["name"])
    (fused / "fuse_config.json").write_text(json.dumps(cfg))
    return judge(ctx.run("fuse", "generate", fused, "--image", ctx.root / "images" / "0.png", "--prompt", "hi"))


# -- Python API --------------------------------------------------------------------------------------------
API_PROBES = {
    "generate(None image)": "m.generate([None], ['<image>\\nWhat?'], max_new_tokens=2)",
    "generate(image, None prompt)": "m.generate([img], [None], max_new_tokens=2)",
    "generate(tensor image)": "m.generate([torch.zeros(3, 56, 56)], ['<image>\\nWhat?'], max_new_tokens=2)",
    "generate(max_new_tokens=-1)": "m.generate([img], ['<image>\\nWhat?'], max_new_tokens=-1)",
    "generate(do_sample, temperature=0)": "m.generate([img], ['<image>\\nWhat?'], max_new_tokens=2, do_sample=True, "
                                          "temperature=0)",
    "generate(prompt=42)": "m.generate([img], [42], max_new_tokens=2)",
    "generate(2 images, 1 prompt list)": "m.generate([img, img], ['a'], max_new_tokens=2)",
    "from_pretrained(dtype='int8')": "fuse.load(FUSED, dtype='int8')",
    "from_pretrained(dtype=torch.int8)": "fuse.load(FUSED, dtype=torch.int8)",
    "from_pretrained(missing dir)": "fuse.load(FUSED + '-nope')",
    "forward(None prompts)": "m(images=[img], prompts=None)",
    "capture_attention(query='sideways')": "m.capture_attention([img], ['<image>\\nWhat?'], query='sideways')",
}


def _api_probe(label: str, call: str):
    def fn(ctx):
        r = ctx.python(f"""
            import sys, torch, fuse
            from PIL import Image
            from fuse.errors import FuseError
            FUSED = {str(ctx.root / 'fused')!r}
            m = fuse.load(FUSED)
            img = Image.open({str(ctx.root / 'images' / '0.png')!r})
            try:
                {call}
            except FuseError as e:
                print("error:", e, file=sys.stderr)
                raise SystemExit(2)
        """)
        return judge(r)
    return fn


for _label, _call in API_PROBES.items():
    PROBES.append(Probe(f"API {_label}", "api", _api_probe(_label, _call)))


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default=None, help="Only probes whose name contains this text (alternatives: a|b).")
    ap.add_argument("-v", "--verbose", action="store_true", help="Print each probe's commands and output.")
    ap.add_argument("--work", default=None, help="Scratch dir (default: a temp dir, removed at the end).")
    ap.add_argument("--json", default=None, help="Write the results here.")
    args = ap.parse_args(argv)
    import fuse

    print(f"fuse from {Path(fuse.__file__).parent}; root: {IS_ROOT}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="fuse-probes-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = work / "fixtures"
    t0 = time.perf_counter()
    if not (root / "fused").is_dir():
        shutil.rmtree(root, ignore_errors=True)
        build_fixtures(root)
    print(f"fixtures ready in {time.perf_counter() - t0:.0f} s", flush=True)
    keys = [k.strip().lower() for k in (args.k or "").split("|") if k.strip()]
    selected = [p for p in PROBES if not keys or any(k in p.name.lower() for k in keys)]
    results = []
    for i, p in enumerate(selected):
        scratch = work / f"p{i:03d}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        ctx = Ctx(root, scratch, args.verbose)
        t = time.perf_counter()
        try:
            res = p.fn(ctx)
        except Exception as e:  # a bug in the probe itself, not in the tool
            res = Outcome("wrong", f"probe failed: {e.__class__.__name__}: {e}")
            ctx.log.append(traceback.format_exc())
        dt = time.perf_counter() - t
        results.append({"name": p.name, "area": p.area, "kind": res.kind, "detail": res.detail,
                        "seconds": round(dt, 1)})
        print(f"{res.kind:10s} {dt:5.1f}s  {p.name}" + (f"  -- {res.detail}" if res.detail else ""), flush=True)
        if args.verbose:
            print(textwrap.indent("\n".join(ctx.log)[-4000:], "    | "), flush=True)
    counts = {k: sum(r["kind"] == k for r in results) for k in ("clear", "ok", "traceback", "data_lost", "wrong",
                                                                  "skipped")}
    tried = len(results) - counts["skipped"]
    print(f"\nprobes tried {tried}: clear errors {counts['clear']}, handled (expected success) {counts['ok']}, "
          f"tracebacks {counts['traceback']}, data lost {counts['data_lost']}, other failures {counts['wrong']}, "
          f"skipped {counts['skipped']}  ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {"tried": tried, **counts}, "results": results}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if counts["traceback"] == counts["data_lost"] == counts["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
