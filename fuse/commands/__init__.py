"""CLI subcommands of ``fuse``, one module each; each exposes ``register(group)``."""
