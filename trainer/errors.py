"""The one exception type for bad user input.

`python -m trainer` turns a UserError into a single line on stderr and exit code 2.
Anything else is a bug and keeps its traceback.
"""


from runspec import UserError  # the one type, shared with infra (see runspec)

__all__ = ["CheckpointError", "DataError", "UserError"]


class DataError(UserError):
    """A missing, truncated or corrupt MNIST file."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, damaged, foreign. `problem` reads after the file's
    name ("is corrupt or truncated (...)"), so that resume can say which file it skipped and why."""

    def __init__(self, path, problem: str, advice: str):
        self.path, self.problem = path, problem
        super().__init__(f"checkpoint {path} {problem}; {advice}")
