"""The one exception type for what a user can fix, so the CLI can tell it from a bug by its type.

A UserError (a config value, a path, an input file that is wrong) is reported as one paragraph
and exit status 2; anything else is a bug and keeps its traceback. It is a ValueError, so code
that guards a value with `except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong: the message names the value and the fix."""
