"""Which MLflow tracking stores a URI can name, known without importing MLflow (`kd validate` stays light):
MLflow's own schemes (its tracking-store registry, `mlflow.tracking._tracking_service.utils`; a test keeps this
list equal to it) and those of installed plugins (the `mlflow.tracking_store` entry points)."""

from __future__ import annotations

from importlib.metadata import entry_points
from urllib.parse import urlparse

MLFLOW_SCHEMES = frozenset({"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                            "databricks-uc", "uc"})


def tracking_schemes() -> frozenset[str]:
    """MLflow's schemes and the installed plugins' ("" is a plain path: a file store)."""
    return MLFLOW_SCHEMES | {ep.name for ep in entry_points(group="mlflow.tracking_store")}


def unknown_scheme(uri: str) -> str | None:
    """Why MLflow has no tracking store for `uri` (its scheme; a database URI's `+driver` aside), or None."""
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme in MLFLOW_SCHEMES:  # (the plugins' entry points are read only for another scheme: ~4 ms)
        return None
    allowed = tracking_schemes()
    if scheme in allowed:
        return None
    return f"unknown scheme {scheme!r} (allowed: {', '.join(sorted(s for s in allowed if s))}, or a plain path)"
