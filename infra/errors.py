"""The laptop side's one exception type for bad user input: one line on stderr, exit code 2."""


from runspec import UserError  # the one type, shared with the trainer (see runspec)

__all__ = ["UserError"]
