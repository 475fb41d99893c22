"""The errors that end a run with one line instead of a traceback, and the exit code of each.

They live here, apart from the code that raises them, so that the command line can tell them apart
without importing torch: `dist-alexnet` catches them and prints `dist-alexnet: error: <message>`.
"""


def first_line(error: BaseException, limit: int | None = 300) -> str:
    """An exception's message reduced to what fits in our one line: its first line (at most `limit`
    characters), or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class ConfigError(ValueError):
    """A bad option or environment. The message lists every problem found, one per line, each with its fix."""


class DataError(ValueError):
    """The data set is missing or malformed. The message names the file and the fix."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or not ours. The message names the file."""


class ReportError(ValueError):
    """The directory is not a run directory with TensorBoard events."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite on some rank; every rank stopped before applying it."""


class RankFailed(RuntimeError):
    """Another rank failed unexpectedly (it printed the traceback); this rank stops too instead of waiting."""


class CollectiveFailed(RuntimeError):
    """A collective with the other ranks failed or timed out: another rank died, hung or was stopped."""


class Interrupted(RuntimeError):
    """A stop signal that could not wait for the next training step (a second Ctrl-C, or a preemption signal
    while the trackers were starting): the command ended at once, without a new checkpoint."""


class ReplicasDiverged(RuntimeError):
    """The ranks' copies of the replicated weights differ (health.check_replicas_agree): every rank stopped."""


class ExportError(RuntimeError):
    """An export that would not do what it says (its ONNX graph does not match the model)."""


# exit code of each: 2 is what the user handed us, the others say what happened to the run
EXIT_CODES = {ConfigError: 2, DataError: 2, CheckpointError: 2, ReportError: 2, TrainingDiverged: 3,
              CollectiveFailed: 4, ExportError: 5, RankFailed: 1, Interrupted: 130,
              ReplicasDiverged: 6}
