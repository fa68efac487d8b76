"""Errors a user can cause; the CLI prints them as one line and exits 2, without a traceback."""


class TinyfedError(Exception):
    """A user's mistake: bad config, bad data file, bad argument. The message is one line."""


class ConfigError(TinyfedError):
    """A config field has a value that is not allowed."""


class DataError(TinyfedError):
    """A data set is missing, corrupt, or cannot be partitioned as asked."""


class WireError(TinyfedError):
    """A message failed to parse or validate; it never reaches the model."""
