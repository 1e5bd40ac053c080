"""Errors that name the bad input and say what to do; raised before any expensive work."""


class ConfigError(ValueError):
    """A configuration that cannot work (unknown class, overlapping splits, bad sizes)."""


class DataError(RuntimeError):
    """Missing or corrupt data on disk (data set not installed, shard missing or corrupt)."""
