"""Nothing a user owns is lost: the output-directory mechanism behind merge, demo, analysis, toyworld,
train and save_pretrained (refusals, the lock, the no-replace rename, signals, stale temp dirs)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fuse.errors import CheckpointError
from fuse.output_dir import MARKER, atomic_output_dir


def snapshot(path: Path) -> dict:
    """What a user would miss: every name under ``path`` (links not followed) with its content."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return {"": os.readlink(path) if stat.S_ISLNK(st.st_mode) else
                path.read_bytes() if stat.S_ISREG(st.st_mode) else (st.st_mode, st.st_rdev)}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else "dir")
            for p in sorted(path.rglob("*"))}


def user_dir(path: Path) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data" / "results.csv").write_text("a,b\n1,2\n")
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ----------------------------------------------------------------------------- case 1: OUT appears meanwhile
def test_directory_created_at_out_during_a_merge_is_kept(tmp_path, monkeypatch, one_error, run_fuse, write_recipe):
    import fuse.merge.run as run

    out = tmp_path / "out"
    real = run.save_vision_branches

    def someone_creates_out(*a, **k):  # e.g. a second merge finishing first, or the user
        user_dir(out)
        return real(*a, **k)

    monkeypatch.setattr(run, "save_vision_branches", someone_creates_out)
    msg = one_error(run_fuse("merge", write_recipe(tmp_path), "-q", "--no-checksums"))
    assert "something was created there while this run was writing; nothing was replaced" in msg
    before = snapshot(user_dir(tmp_path / "expected"))
    assert snapshot(out) == before  # the user's directory is untouched
    kept = tmp_path / "out.new"  # the finished result is kept under a clear name
    assert str(kept) in msg and (kept / "llm" / "model.safetensors").is_file() and (kept / MARKER).is_file()
    assert leftovers(tmp_path, "out") == []


def test_a_second_writer_of_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "first").write_text("1")
        with pytest.raises(CheckpointError, match=rf"another process \(pid {os.getpid()}\) is writing this output"):
            with atomic_output_dir(out) as tmp2:
                (tmp2 / "second").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "first"] and leftovers(tmp_path, "out") == []


def test_two_merges_to_one_new_out_at_once(tmp_path, one_error, run_fuse, write_recipe):
    """A real second process: while one merge writes OUT, another fails at once with one line; the first
    then completes OUT (before: both ran, and the later finisher silently replaced the first's output)."""
    go = tmp_path / "go"
    first = _merge_in_child(tmp_path, write_recipe(tmp_path), f"print('writing', flush=True)\n"
                            f"            while not os.path.exists({str(go)!r}): time.sleep(0.05)")
    try:
        _wait_for_line(first, "writing")
        msg = one_error(run_fuse("merge", write_recipe(tmp_path), "-q", "--no-checksums"))
        assert f"another process (pid {first.pid}) is writing this output" in msg
    finally:
        go.touch()
        rc = first.wait(timeout=300)
    assert rc == 0, first.stderr.read()
    out = tmp_path / "out"
    assert (out / "fuse_config.json").is_file() and (out / "llm" / "model.safetensors").is_file()
    assert leftovers(tmp_path, "out") == [] and not (tmp_path / "out.new").exists()


# ----------------------------------------------------------------------------- case 3: --force onto non-outputs
@pytest.mark.parametrize("kind", ["user dir", "symlink to a user dir", "recipe output.dir is a file",
                                  "current directory", "char device"])
def test_force_replaces_only_a_directory_fuse_wrote(tmp_path, kind, monkeypatch, one_error, run_fuse, write_recipe):
    target = tmp_path / "out"
    precious = None
    if kind == "user dir":
        user_dir(target)
    elif kind == "recipe output.dir is a file":  # (-o FILE is refused by click itself)
        target.write_text("my notes")
    elif kind == "symlink to a user dir":
        precious = user_dir(tmp_path / "precious")
        target.symlink_to(precious)
    elif kind == "current directory":
        user_dir(target)
        monkeypatch.chdir(target)
    elif kind == "char device":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    before = snapshot(target)
    kept = snapshot(precious) if precious else None
    rec = write_recipe(tmp_path)
    args = [rec, "--force"] + ([] if kind == "recipe output.dir is a file" else
                               ["-o", "." if kind == "current directory" else target])
    msg = one_error(run_fuse("merge", *args, "-q", "--no-checksums"))
    why = {"user dir": "was not written by this toolkit", "symlink to a user dir": "is a symlink",
           "recipe output.dir is a file": "is a file", "current directory": "is (or contains) the current directory",
           "char device": "is a character device"}[kind]
    assert f"exists and {why}; choose another output (--force replaces only an empty directory" in msg
    assert snapshot(target) == before and (precious is None or snapshot(precious) == kept)
    assert leftovers(tmp_path, "out") == []


def test_force_onto_a_fifo_neither_hangs_nor_replaces_it(tmp_path):
    """On a FIFO the old cleanup (rmtree) blocked forever: run in a child with a deadline."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        from fuse.errors import CheckpointError
        from fuse.output_dir import atomic_output_dir
        try:
            with atomic_output_dir({str(fifo)!r}, force=True) as tmp:
                (tmp / "x").write_text("new")
        except CheckpointError as e:
            print("refused:", e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in p.stdout and "exists and is a FIFO" in p.stdout, p.stdout + p.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and leftovers(tmp_path, "out") == []


def test_force_replaces_an_empty_dir_and_its_own_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "a").write_text("1")
    (out / "added").write_text("by hand")  # still fuse's output: --force replaces it whole
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b"] and leftovers(tmp_path, "out") == []
    with pytest.raises(CheckpointError, match="output exists"):
        with atomic_output_dir(out):
            pass


# ----------------------------------------------------------------------------- paths that cannot be written
@pytest.mark.parametrize("kind", ["symlink loop", "inside a symlink loop", "parent is a file"])
def test_unusable_output_paths_are_one_line_errors(tmp_path, kind, one_error, run_fuse, write_recipe):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    f = tmp_path / "file"
    f.write_text("x")
    out = {"symlink loop": loop, "inside a symlink loop": loop / "out", "parent is a file": f / "out"}[kind]
    for extra in ([], ["--force"]):
        rec = write_recipe(tmp_path, output={"dir": str(out)})
        msg = one_error(run_fuse("merge", rec, *extra, "-q", "--no-checksums"))
        assert str(out) in msg
    assert os.readlink(loop) == "loop" and f.read_text() == "x"


def test_read_only_output_parent(tmp_path, read_only_dir, one_error, run_fuse, write_recipe):
    earlier = tmp_path / "ro" / "fused"
    rec = write_recipe(tmp_path)
    res = run_fuse("merge", rec, "-o", earlier, "-q", "--no-checksums")
    assert res.exit_code == 0, res.output
    before = snapshot(earlier)
    with read_only_dir(tmp_path / "ro"):
        msg = one_error(run_fuse("merge", rec, "-o", tmp_path / "ro" / "new", "-q", "--no-checksums"))
        assert f"cannot write in {tmp_path / 'ro'}" in msg
        one_error(run_fuse("merge", rec, "-o", earlier, "--force", "-q", "--no-checksums"))
        one_error(run_fuse("demo", "-o", tmp_path / "ro" / "demo"))
    assert snapshot(earlier) == before and sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["fused"]


def test_disk_full_names_the_output_not_the_temp_dir(tmp_path, monkeypatch, one_error, run_fuse):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        with atomic_output_dir(out) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "llm" / "model.safetensors"))
    assert str(e.value) == f"{out}: disk full (no space left on device) while writing {out}/llm/model.safetensors; " \
                           "nothing was written"
    # safetensors reports a full disk with its own exception type (seen in `fuse demo`)
    import fuse.testing.builders as builders

    class SafetensorError(Exception):
        pass

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(builders.ShardedWriter, "close", full)
    msg = one_error(run_fuse("demo", "-o", tmp_path / "demo"))
    assert msg == f"error: {tmp_path / 'demo'}: disk full (no space left on device); nothing was written"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- case 5: signals
def _merge_in_child(tmp_path: Path, rec: Path, hook: str) -> subprocess.Popen:
    """`fuse merge` in a child process; ``hook`` runs once the LLM shards are written."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        import fuse.merge.run as run
        real = run.save_vision_branches
        def hook(*a, **k):
            {hook}
            return real(*a, **k)
        run.save_vision_branches = hook
        from fuse.cli import main
        sys.argv = ["fuse", "merge", {str(rec)!r}, "-q", "--no-checksums"]
        main()
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for_line(p: subprocess.Popen, text: str) -> None:
    for line in p.stdout:
        if line.strip() == text:
            return
    raise AssertionError(f"child ended without printing {text!r}: {p.stderr.read()}")


def test_sigterm_is_handled_like_ctrl_c(tmp_path, write_recipe):
    p = _merge_in_child(tmp_path, write_recipe(tmp_path), "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    rc, err = p.wait(timeout=300), p.stderr.read()
    assert rc == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM: nothing was left half-written" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_sigkill_leftovers_are_removed_and_reported_by_the_next_run(tmp_path, write_recipe):
    p = _merge_in_child(tmp_path, write_recipe(tmp_path), "print('writing', flush=True); time.sleep(60)")
    try:
        _wait_for_line(p, "writing")
    finally:
        p.kill()
        p.wait()
    stale = [q for q in tmp_path.iterdir() if q.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / "llm").is_dir()  # the partial output of the killed merge
    notes = []
    with atomic_output_dir(tmp_path / "out", note=notes.append) as tmp:
        (tmp / "x").write_text("1")
    assert not stale[0].exists() and leftovers(tmp_path, "out") == []
    assert len(notes) == 1 and notes[0].startswith(f"removed {stale[0]}: unfinished output left by process "
                                                   f"{p.pid}, which no longer runs")


def test_a_live_writers_temp_dir_is_never_swept(tmp_path):
    """The sweep removes temp dirs of dead processes only (pid + start time in the name)."""
    live = tmp_path / f".out.tmp-{os.getpid()}-0-x"  # our pid, but another start time: a reused pid, stale
    live.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        t0 = int(round(psutil.Process(child.pid).create_time() * 100))
        running = tmp_path / f".out.tmp-{child.pid}-{t0}-y"
        running.mkdir()
        with atomic_output_dir(tmp_path / "other", note=lambda m: None):
            pass
        assert live.exists() and running.exists()  # another OUT's name: not touched
        notes = []
        with atomic_output_dir(tmp_path / "out", note=notes.append):
            assert running.exists() and not live.exists()
        assert len(notes) == 1 and str(live) in notes[0]
    finally:
        child.kill()
        child.wait()


# ----------------------------------------------------------------------------- case 2: save_pretrained
@pytest.fixture(scope="module")
def fused(llava_pair, tmp_path_factory):
    import fuse
    from fuse.testing.fused import build_fused_dir

    return fuse.load(build_fused_dir(tmp_path_factory.mktemp("fz") / "fused", [llava_pair["a"], llava_pair["b"]]))


def test_save_pretrained_never_deletes_other_files(tmp_path, fused):
    mine = user_dir(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(CheckpointError, match="exists and was not written by this toolkit"):
        fused.save_pretrained(mine)
    assert snapshot(mine) == before
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="exists and is a file"):
        fused.save_pretrained(f)
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    # a new dir, and again over its own earlier save (like transformers' save_pretrained)
    fused.save_pretrained(tmp_path / "saved")
    fused.save_pretrained(tmp_path / "saved")
    import fuse

    assert fuse.load(tmp_path / "saved").member_names == fused.member_names
    assert leftovers(tmp_path, "saved") == []


# ----------------------------------------------------------------------------- case 4: toyworld compare
def test_toyworld_compare_refuses_an_existing_dir(tmp_path, one_error, run_fuse):
    out = tmp_path / "cmp"
    user_dir(out / "test")
    user_dir(out / "fused-linear")
    before = snapshot(out)
    for force in ([], ["--force"]):
        t = time.perf_counter()
        res = run_fuse("toyworld", "compare", "-o", out, "--limit", "2", *force)
        assert "exists and was not written by this toolkit" in one_error(res)
        assert snapshot(out) == before and time.perf_counter() - t < 30  # refused before any work


def test_toyworld_generate_and_demo_force_only_replace_their_own_output(tmp_path, one_error, run_fuse):
    for cmd in (["toyworld", "generate", "--n-train", "4", "--n-test", "4"], ["demo"]):
        out = user_dir(tmp_path / cmd[0])
        before = snapshot(out)
        msg = one_error(run_fuse(*cmd, "-o", out, "--force"))
        assert "exists and was not written by this toolkit" in msg and snapshot(out) == before
    res = run_fuse("toyworld", "generate", "--n-train", "4", "--n-test", "4", "-o", tmp_path / "w")
    assert res.exit_code == 0, res.output
    res = run_fuse("toyworld", "generate", "--n-train", "4", "--n-test", "4", "--seed", "1", "-o", tmp_path / "w",
                   "--force")
    assert res.exit_code == 0 and json.loads((tmp_path / "w" / "toyworld.json").read_text())["seed"] == 1
