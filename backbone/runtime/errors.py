"""The one exception type that tools turn into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config key, missing file, ...): no traceback is shown.

    The message should be one line naming the file or setting and the problem.
    """
