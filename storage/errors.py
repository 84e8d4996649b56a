"""Errors a user can cause, as opposed to bugs.

Every layer raises `UserError` (or a subclass) for things the person running overnight can fix:
a bad config, a malformed file, an unreachable database. The CLI turns them into one line on
stderr and exit code 2; anything else is an internal failure (exit 1) and may carry a traceback.
It lives in `storage` because that is the one package every other package may import.
"""


class UserError(Exception):
    """A problem the user can fix; its message is one line that says what and where."""


class SchemaNotReady(UserError):
    """The database exists but its schema is missing or older than this version of overnight."""


class InvalidRecord(UserError):
    """An interaction record failed validation; the message names the field and the problem."""
