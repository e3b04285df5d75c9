"""Errors refsim raises for user mistakes and bad input.

Every error a user can cause derives from :class:`RefsimError`; the CLI prints it as one
line on stderr and exits with status 2. Anything else escaping the CLI is a refsim bug.
"""


class RefsimError(Exception):
    """Base class: a problem with a model, an input or an argument, not a bug in refsim."""


class IntqFormatError(RefsimError):
    """A `.intq` file is malformed, truncated, corrupted or of an unknown version."""


class GraphError(RefsimError):
    """A graph is invalid: unknown op, dangling tensor, cycle, type or attribute error."""


class InputError(RefsimError):
    """Feeds or input files do not match what the model expects."""


class OpError(RefsimError):
    """An op could not compute its result exactly (for example accumulator overflow).

    Raised by op functions without knowing which node they run for; the engine adds the
    node name before the error reaches the user.
    """


class AccumulatorOverflow(OpError):
    """An exact result does not fit the declared accumulator and the policy is `error`."""


class InternalError(RuntimeError):
    """A refsim bug, not a user's mistake: never turned into a one-line error, always
    reported with its traceback. Build it with `internal_error`."""


def internal_error(what: str) -> InternalError:
    return InternalError(f"refsim bug: {what}; please report it (with the model if you can share it)")
