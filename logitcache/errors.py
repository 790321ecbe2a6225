"""Error types. Messages say what was found, what was expected, and what to do.

Every error is a :class:`LogitCacheError`; most are also a builtin (``ValueError``,
``FileNotFoundError``) so callers that catch builtins keep working.
"""

from __future__ import annotations


class LogitCacheError(Exception):
    """Base class of every error raised by logitcache."""


class ConfigError(LogitCacheError, ValueError):
    """A configuration value is invalid or inconsistent."""


class TargetsError(LogitCacheError, ValueError):
    """Data handed to a stage is malformed: NaN or infinite logits, token ids outside the vocabulary,
    or targets (or the arrays beside them) whose shapes do not match their tokens, labels or each other.

    Unlike :class:`ConfigError` the settings are fine; the values passed in are not.
    """


class CorpusError(LogitCacheError, ValueError):
    """The corpus cannot be read or yields no usable text."""


class TeacherError(LogitCacheError, ValueError):
    """The teacher cannot be loaded or does not fit the request."""


class StoreError(LogitCacheError, ValueError):
    """A store is malformed, incompatible, or cannot be written."""


class StoreMismatchError(StoreError):
    """An existing store was written with a different configuration."""


class StoreNotFoundError(LogitCacheError, FileNotFoundError):
    """No store (or no manifest) exists at the given location."""


class CorruptShardError(StoreError):
    """A shard's bytes do not match its recorded checksum, size or schema."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


class StoreWriteError(StoreError):
    """The store cannot be written: disk full, file too large, permission denied, read-only filesystem."""
