"""The errors of reading untrusted files."""

__all__ = ["UnsafeFileError", "ConfigFileError"]


class UnsafeFileError(ValueError):
    """A config or checkpoint holds something that would run code when loaded; nothing was run."""


class ConfigFileError(ValueError):
    """A config file cannot be read: not UTF-8, not YAML, or a ``_BASE_`` chain that loops."""
