"""Errors that the CLI turns into exit status 2 with a clear message (usage or configuration problems)."""


class OvisDataError(Exception):
    """A configuration or usage error: unknown dataset, missing root, unreadable or malformed file."""
