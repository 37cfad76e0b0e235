"""Fixtures of the train tests: a toy dataset, a trained stage-1 run (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than
# oversubscribed threads, and keeps CPU results reproducible.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """(json path, image root) of 16 memorisable coloured-shape samples."""
    from train.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "data", n=16)


@pytest.fixture(scope="session")
def toy_cfg(tiny_base, toy_data):
    """Factory: a toy stage-1 config dict with overrides."""
    from train.toy import toy_config

    def make(output_dir, **over):
        return toy_config(tiny_base, toy_data[0], toy_data[1], output_dir, **over)

    return make


def run_cli(*args: str):
    """Invoke ``train ...`` in-process; returns click's Result."""
    from click.testing import CliRunner

    from train.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_yaml(path, cfg: dict):
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, toy_cfg):
    """Output dir of a finished 40-step COMM stage-1 run on the toy data, run through the CLI."""
    d = tmp_path_factory.mktemp("stage1")
    cfg = toy_cfg(d / "ignored", save_every=20)
    cfg.pop("output_dir")
    cfg.pop("stage")
    cfg.pop("max_steps")
    y = write_yaml(d / "stage1.yaml", cfg)
    res = run_cli("comm", "--stage", "1", "-c", str(y), "-o", str(d / "run"), "--max-steps", "40")
    assert res.exit_code == 0, res.output
    return d / "run"


@pytest.fixture(scope="session")
def cli():
    """``cli(*args)`` runs ``train ...`` in-process and returns click's Result."""
    return run_cli


@pytest.fixture(scope="session")
def yaml_file():
    """``yaml_file(path, dict)`` writes a config YAML and returns the path."""
    return write_yaml
