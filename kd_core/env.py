"""Offline, quiet defaults applied before any of the stack is imported (stack.md).

Only defaults: a user's environment wins. Telemetry of Prefect, MLflow, DVC and HF is off; HF never
reaches for the hub unless the user unsets HF_HUB_OFFLINE.
"""

from __future__ import annotations

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
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # `kd run` without a server starts a temporary one (20 s allowed by default); two runs starting at once in
    # one project migrate the same .prefect database, and on a loaded machine the second timed out
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".torch_extensions"))
