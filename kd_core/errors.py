"""Every error the pipeline reports, and how each is treated: one home, from which both the CLI's exit status
and the Prefect flow's retry rule are derived.

* `UserError`: bad input or configuration (a typo, a missing file, a stage run before its inputs exist). It
  fails the same way again: `kd` prints one line per problem and exits with status 2; the flow does not retry.
* `Transient`: a marker for what may pass by itself (an MLflow server that is down): the flow retries it.
* `KDError`: the base; an error of ours that is neither (e.g. a diverged loss) exits with status 1, one line,
  and is not retried (same seed, same data, same checkpoint: it recurs).

Python's own `ValueError`, `LookupError` and `FileNotFoundError` raised by the stages for bad input count as
user errors too (`is_user_error`); anything else is a bug or an outside failure: a traceback, and a retry.
"""

from __future__ import annotations


class KDError(Exception):
    """An error of the pipeline, reported as one line per message line (no traceback)."""

    exit_code = 1
    retryable = False


class UserError(KDError, ValueError):
    """Bad input: `kd` exits with status 2; never retried."""

    exit_code = 2


class Transient(KDError):
    """May pass by itself (a server that is down): retried by the flow."""

    retryable = True


class ConfigError(UserError):
    """A bad params.yaml: the message is one line per problem, each naming the file and the key."""


class DataError(UserError):
    """Data that cannot be used: the message names the file, the line or the field."""


class ModelError(UserError):
    """A model source that cannot be loaded or does not fit the others."""


class CacheError(UserError):
    """A teacher cache that does not fit the data or the models it is used with."""


class TeacherSupportError(ModelError):
    """The teacher gives probability 0 to a token the student sampled (an infinite reverse KL): the message names
    the token and where it was sampled."""


class MissingInput(UserError, FileNotFoundError):
    """A stage run before the stage that makes its input: the message names the stage to run first."""


class PreflightError(UserError):
    """A training stage cannot run as configured: the message says what and how to fix it."""


class TrackingUnreachable(PreflightError, Transient):
    """The MLflow server does not answer (or is unhealthy): reported like any preflight error (exit 2), but
    the flow retries it, since the server may be back."""

    exit_code = 2


class TrainingDiverged(KDError):
    """A NaN or inf loss: the message has the step, the batch shape and the loss terms."""


class Cancelled(KDError):
    """SIGTERM (a Prefect cancel, a preempted node): training stopped at a step boundary and wrote a checkpoint;
    running the stage again resumes from it. Exit status 143 (128 + SIGTERM), as a process ended by it; never
    retried (kd_core/training/interrupts.py)."""

    exit_code = 143


# Python's own exceptions that the stages raise for bad input
_BUILTIN_USER_ERRORS = (ValueError, LookupError, FileNotFoundError)


def is_user_error(err: BaseException) -> bool:
    """Bad input: one line and exit status 2 in the CLI, no retry in the flow."""
    if isinstance(err, KDError):
        return err.exit_code == 2
    return isinstance(err, _BUILTIN_USER_ERRORS)


def is_reported(err: BaseException) -> bool:
    """Reported as one line (no traceback) by the CLI."""
    return isinstance(err, KDError) or is_user_error(err)


def exit_code(err: BaseException) -> int:
    return err.exit_code if isinstance(err, KDError) else 2 if is_user_error(err) else 1


def is_retryable(err: BaseException) -> bool:
    """The flow's retry rule: transient errors, and failures that are not ours (I/O, a crashed library)."""
    if isinstance(err, KDError):
        return err.retryable
    return not is_user_error(err)


class RunFolderBusy(UserError, Transient):
    """Another pipeline holds the run folder: the message names the holder (host, pid, since when). Exit 2 in
    the CLI; the flow retries it (the other run may end)."""


class TrackingLost(Transient):
    """The MLflow server stopped answering while a stage was using it (it passed the preflight): exit status 75
    (EX_TEMPFAIL); the flow retries it. What the stage had registered is completed by the rerun (a version is
    created `kd.pending` and cleared once complete: kd_core/stages/register.py)."""

    exit_code = 75


class WriteFailed(KDError):
    """An output could not be written (a full disk or quota, a read-only or failing disk): the message names the
    path, and the previous output there is intact (every write is atomic: kd_core/io.py). Exit status 74
    (EX_IOERR); not retried by the flow (a full disk is still full two seconds later): free space and run again,
    a training stage resumes from its last checkpoint."""

    exit_code = 74


class EndpointUnreachable(Transient):
    """A served teacher's endpoint (`teacher.model.endpoint`) does not answer, times out or answers a server error
    (5xx): the message names the URL (never the API key). Exit status 75 (EX_TEMPFAIL); the flow retries it."""

    exit_code = 75


class EndpointError(ModelError):
    """A served teacher's endpoint answers, but not as asked (a client error status such as a wrong model name or
    key, a response without log-probs or with a wrong number of tokens): the message names the URL; never retried."""


class ClusterUnreachable(PreflightError, Transient):
    """The Ray cluster that `execution` names does not answer, or cannot offer a stage's workers: reported like any
    preflight error (exit 2); the flow retries the unreachable case, since the cluster may be back."""

    exit_code = 2
