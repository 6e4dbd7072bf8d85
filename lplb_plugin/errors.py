"""Exceptions raised by lplb_plugin.

Every user-facing validation error is a :class:`LPLBConfigError` (bad configuration
values) or a :class:`LPLBInputError` (bad tensors or arguments at call time).  Both
subclass :class:`ValueError` so callers that already catch ``ValueError`` keep working.
"""


class LPLBError(Exception):
    """Base class of every error raised on purpose by lplb_plugin."""


class LPLBConfigError(LPLBError, ValueError):
    """A configuration key or value is wrong; the message names the key, the value and
    what is allowed."""


class LPLBInputError(LPLBError, ValueError):
    """A tensor or argument passed at call time is wrong; the message names the
    argument and the expected value."""
