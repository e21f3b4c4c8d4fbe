"""Exceptions that carry a user-facing meaning.

A :class:`ConfigError` is a user mistake (bad file, bad key, bad value): the CLI prints its
one-line message once, from rank 0, and exits with status 2, without a traceback.
"""


class ConfigError(Exception):
    """A user mistake in the configuration or the command line."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class MissingDependency(ConfigError):
    """An optional feature needs a package that is not installed."""

    def __init__(self, feature: str, package: str, extra: str):
        super().__init__(
            f"{feature} needs the '{package}' package: pip install 'mpiopt[{extra}]'"
        )
