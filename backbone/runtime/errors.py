"""The exception types that tools turn into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config key, missing file, ...): no traceback is shown.

    The message should be one line naming the file or setting and the problem.
    """


class WriteError(UserError, OSError):
    """A file could not be saved (disk full, no permission, ...); ``path`` is the file.

    Also an OSError, so code that catches OSError around a write keeps working.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path
