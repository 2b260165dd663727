"""The one exception type the command line turns into a single line on stderr."""


class UsageError(ValueError):
    """Something the user can fix: bad input, a missing file, an impossible combination of sizes."""
