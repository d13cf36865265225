"""The codec's own error type: every expected failure is a BdcError with a one-line message."""

__all__ = ["BdcError"]


class BdcError(Exception):
    """A failure to report to the user in one line (bad input, corrupt file, wrong weights)."""
