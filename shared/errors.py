"""Errors storefed raises on bad input: each message names the file, line or key."""


class StorefedError(Exception):
    """Base class: the CLI prints these as one paragraph, without a traceback."""


class DataError(StorefedError):
    """A data file or directory is missing, malformed or unusable."""


class ConfigError(StorefedError):
    """A run-config key is unknown or has the wrong type or value."""


class CheckpointError(StorefedError):
    """A checkpoint is corrupted or does not match the model/catalog it is loaded into."""
