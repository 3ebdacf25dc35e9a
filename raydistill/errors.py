"""The project's own error types, below every layer that raises them (``raydistill.config`` re-exports
``ConfigError``, where users and the CLI catch it)."""


class ConfigError(ValueError):
    """A config file, key or value is not valid; the message names the key path and what is allowed."""
