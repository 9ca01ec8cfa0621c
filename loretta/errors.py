"""Error types. Every message names the field or file, the bad value, and the fix."""

from __future__ import annotations


class LorettaError(Exception):
    """Base class for errors a user can fix."""


class ConfigError(LorettaError):
    """One or more configuration problems, collected and reported together."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


class DataError(LorettaError):
    """Bad data: a shard, sample or manifest that cannot be used as configured."""


class CheckpointError(LorettaError):
    """A checkpoint folder that is missing, incomplete, corrupt or incompatible."""


class DependencyError(LorettaError):
    """An installed package outside the versions loretta was tested with."""
