"""One exception root so the CLI can turn every expected failure into a clean message."""


class PromptsegError(Exception):
    """Base of every error promptseg raises on purpose (bad input, bad config, failed gate)."""


class DataError(PromptsegError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


class ConfigError(PromptsegError):
    """A configuration value or option is invalid."""
