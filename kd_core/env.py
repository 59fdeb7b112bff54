"""Offline, quiet defaults applied before any of the stack is imported (stack.md).

Only defaults: a user's environment wins. Telemetry of Prefect, MLflow, DVC and HF is off; HF never
reaches for the hub unless the user unsets HF_HUB_OFFLINE.

Quiet: the libraries' own progress bars (HF "Loading weights", "Writing model shards") are off, and a few
harmless messages are dropped (`quiet_libraries`). Prefect's console shows warnings only, while its run logs
(the flow's stage lines, a launched stage's output) still reach the Prefect server at INFO, so the UI shows
them; PREFECT_LOGGING_LEVEL=INFO (or DEBUG) gives Prefect's own console at that level, as in Prefect.
"""

from __future__ import annotations

import logging
import os

DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # transformers' and datasets' bars ("Loading weights", "Writing model shards", "Map"): noise between the
    # stage lines (the Trainer's bar is ours: kd_core.training.trainer)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # `kd run` without a server starts a temporary one (20 s allowed by default); two runs starting at once in
    # one project migrate the same .prefect database, and on a loaded machine the second timed out
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Ray (execution.engine: ray): no usage report; no token authentication, whose token Ray 2.60 writes into the
    # home folder (a cluster that wants it: set RAY_AUTH_MODE=token where the pipeline runs)
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # a local Ray started for the run runs its workers at the run's priority (Ray's default is niceness 15: on a
    # busy machine the stages' Ray workers then got a fraction of the CPU a local stage gets)
    "RAY_worker_niceness": "0",
}
# Prefect at its default WARNING: its console handler shows warnings and errors only (the stage lines are printed
# by kd_core.pipeline.console), while the run loggers log at INFO to the server (the UI's logs: stage lines, a launched
# stage's output, task states). Another PREFECT_LOGGING_LEVEL is Prefect's own behaviour: its console at that level.
PREFECT_LEVEL = "WARNING"
PREFECT_QUIET = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
                 "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
                 "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO"}

# (logger, start of a message) dropped: harmless in this pipeline
DROPPED = (
    # encode_example truncates to tokenizer.max_length itself; the tokenizer warns before it does
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than"),
    # DeepSpeed's import on a machine without a GPU: CPU is what it then uses, and what we expect
    ("DeepSpeed", "Setting accelerator to CPU"),
    # `generate` drops an all-ones attention mask (no padding), then the model's check sees a sampled token equal
    # to the pad id and warns; every forward of ours passes its mask (kd_core.models.lm)
    ("transformers.modeling_utils", "We strongly recommend passing in an `attention_mask`"),
)
QUIET_LEVELS = {"mlflow.store.db.utils": logging.WARNING}  # "Creating initial MLflow database tables..."


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_libraries() -> None:
    """Drop the harmless messages of `DROPPED` and `QUIET_LEVELS` (idempotent; before or after the imports:
    a library that configures its logger later keeps the filter)."""
    for name, prefix in DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
    for name, level in QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(level)


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if os.environ.setdefault("PREFECT_LOGGING_LEVEL", PREFECT_LEVEL).upper() == PREFECT_LEVEL:
        for key, value in PREFECT_QUIET.items():
            os.environ.setdefault(key, value)
    else:  # the user's level, e.g. INFO: Prefect's console at that level, not our quiet one (inherited from a
        for key, value in PREFECT_QUIET.items():  # parent process that imported kd_core)
            if os.environ.get(key) == value:
                del os.environ[key]
    os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".torch_extensions"))
    quiet_libraries()
