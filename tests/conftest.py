"""Session-wide tiny checkpoints shared by all test areas (built once, in a temp dir)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process / longer test (still run in CI; < 60 s)")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny LLaMA base LLM directory (vocab 256)."""
    from fuse.testing import build_base_llm

    return build_base_llm(tmp_path_factory.mktemp("base") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_hf(tmp_path_factory, tiny_base):
    """(dir, LlavaForConditionalGeneration) of a tiny llava-hf member fine-tuned from ``tiny_base``."""
    from fuse.testing import build_llava_hf_member

    return build_llava_hf_member(tmp_path_factory.mktemp("llava_hf") / "llava_hf", tiny_base, seed=1)


@pytest.fixture(scope="session")
def tiny_llava_orig(tmp_path_factory, tiny_llava_hf):
    """The same weights as ``tiny_llava_hf`` in the original LLaVA-1.5 layout."""
    from fuse.testing import llava_hf_to_original

    return llava_hf_to_original(tiny_llava_hf[0], tmp_path_factory.mktemp("llava") / "llava", image_aspect_ratio="square")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch():
    """``launch(*args, timeout=300)``: ``accelerate launch --main_process_port <free port> *args``.

    One intra-op thread per process, offline; returns the finished ``CompletedProcess``.
    """

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
               "--main_process_port", str(_free_port()), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture()
def read_only_dir():
    """``with read_only_dir(path):`` makes ``path`` (created if needed) unwritable, even for root
    (``chattr +i``; plain chmod otherwise); skips the test where neither works."""
    import contextlib
    import shutil
    import subprocess
    import tempfile

    @contextlib.contextmanager
    def make(path):
        path.mkdir(parents=True, exist_ok=True)
        immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and \
            subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o555)
        try:
            try:
                tempfile.TemporaryFile(dir=path).close()
                pytest.skip(f"cannot make {path} read-only here")
            except OSError:
                pass
            yield path
        finally:
            if immutable:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            else:
                path.chmod(0o755)

    return make


@pytest.fixture(scope="session")
def one_error():
    """``one_error(result)``: the single ``error: ...`` line of a click run that failed cleanly
    (exit code 2, no traceback, no uncaught exception)."""
    def check(res) -> str:
        assert res.exit_code == 2, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert "Traceback" not in res.output, res.output
        lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, res.output
        return lines[0]

    return check
