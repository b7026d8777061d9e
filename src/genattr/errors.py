"""The one exception type users see: the CLI prints its message and exits with code 2."""


class GenattrError(Exception):
    """Bad input or an unusable file; the message names the file and the problem."""
