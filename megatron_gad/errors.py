"""The project's user-error base class.

An error a user can fix (a config key, a data row, a model directory, a checkpoint, a CLI flag)
derives from :class:`UserError`. Entry points catch ``UserError`` alone, print its one line and
exit 2; any other exception is an internal error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input, reported as one line naming what and where."""


__all__ = ["UserError"]
