"""The laptop side's one exception type for bad user input: one line on stderr, exit code 2."""


class UserError(Exception):
    """Bad input: a flag, a name, a file, credentials. The message says what to do next."""
