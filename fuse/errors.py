"""User-facing errors.

Every error a user can cause (bad path, bad recipe field, corrupt file) is raised
as a :class:`FuseError` subclass whose message is one line naming the file or
field and what was expected. The CLIs turn these into ``error: <message>`` on
stderr and a non-zero exit code, without a traceback.
"""

from __future__ import annotations


class FuseError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""

    exit_code = 2

    def __str__(self) -> str:  # keep it one line whatever was passed in
        return " ".join(str(a) for a in self.args).replace("\n", " ").strip()


class CheckpointError(FuseError):
    """A checkpoint directory or file is missing, unreadable, truncated or of an unknown kind."""


class FormatError(FuseError):
    """A member checkpoint does not match any supported format, or lacks keys the format needs."""


class RecipeError(FuseError):
    """A recipe YAML has a missing/invalid field."""


class FamilyError(FuseError):
    """Members cannot be merged: different architecture, shapes, tokenizer or base."""


class DataError(FuseError):
    """An image, dataset or question file is missing or malformed."""


class NumericsError(FuseError):
    """A model produced NaN/Inf (broken weights, or overflow in a low-precision dtype)."""
