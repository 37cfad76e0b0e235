"""``train`` command-line interface."""

from __future__ import annotations

import importlib

import click

from fuse.cli_utils import FriendlyGroup


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train fusion baselines (COMM) on LLaVA-format data."""


def _register_commands() -> None:
    for mod in ("train.commands",):
        try:
            importlib.import_module(mod).register(main)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_register_commands()
