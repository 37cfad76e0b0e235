"""``analysis`` command-line interface."""

from __future__ import annotations

import click

from fuse.cli_utils import CONTEXT_SETTINGS, FriendlyGroup

from . import commands


@click.group(cls=FriendlyGroup, context_settings=CONTEXT_SETTINGS)
def main() -> None:
    """Reports on visual tokens: alignment, attention, CLIP-blind pairs, layers."""


commands.register(main)
