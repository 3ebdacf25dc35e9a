"""The project's own error types, below every layer that raises them (``raydistill.config`` re-exports
``ConfigError``, where users and the CLI catch it; ``raydistill.data.topk_codec`` re-exports ``CodecError``)."""


class ConfigError(ValueError):
    """A config file, key or value is not valid; the message names the key path and what is allowed."""


class CodecError(ValueError):
    """Encoded data that does not decode (a corrupted or truncated payload); the caller names the file."""
