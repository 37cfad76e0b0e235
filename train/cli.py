"""``train`` command-line interface."""

from __future__ import annotations

import click

from fuse.cli_utils import CONTEXT_SETTINGS, FriendlyGroup

from . import commands


@click.group(cls=FriendlyGroup, context_settings=CONTEXT_SETTINGS)
def main() -> None:
    """Train fusion baselines (COMM) on LLaVA-format data."""


commands.register(main)
