"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class PipelineError(Exception):
    """Something the user can fix: the message names the file, row or key and what is wrong."""


class DataError(PipelineError):
    """Unusable input data: a missing folder or file, an unreadable image, a bad label."""


class BundleError(PipelineError):
    """Not a bundle, or a damaged one."""


class OutOfTime(PipelineError):
    """The time budget ran out: the run stopped cleanly after an epoch; resume_from (or the same command) goes on."""

    exit_code = 75  # EX_TEMPFAIL: try again later
