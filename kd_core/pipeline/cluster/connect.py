"""The connection of this process to the Ray cluster that `execution` names: `ray_address`, else RAY_ADDRESS, else
a local Ray started for the run (this machine's CPUs and GPUs; it ends with the process).

An address that does not answer is a `ClusterUnreachable` naming it, found in a few seconds (a TCP connect before
Ray's own, which waits much longer). Workers get the stage's environment from `worker_env`: the project's
variables (KD_*, MLflow's, HF's, ...) as they are in this process when the stage starts, so that a remote node
sees what a local process would have inherited.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from urllib.parse import urlsplit

from kd_core.errors import ClusterUnreachable

log = logging.getLogger("kd")

CONNECT_TIMEOUT_S = 5.0
# what a stage's Ray workers take from the environment of the process that submits it
FORWARDED_PREFIXES = ("KD_", "MLFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "DVC_", "PREFECT_", "TORCH_",
                      "DO_NOT_TRACK", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")
_lock = threading.Lock()


def address_of(execution) -> str | None:
    """The cluster's address: `execution.ray_address`, else RAY_ADDRESS, else None (a local Ray)."""
    return execution.ray_address or os.environ.get("RAY_ADDRESS") or None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `ray://host:port` or `host:port`; None for Ray's keywords (`auto`, `local`)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.hostname is None or parts.port is None:
        return None
    return parts.hostname, parts.port


def check_answers(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A `ClusterUnreachable` naming the key and the address when nothing listens there."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as err:
        raise ClusterUnreachable(f"execution.ray_address: no Ray cluster answers at {address!r} ({err}); start it "
                                 f"(`ray start --head`), fix the address, or set it to null for a local Ray") from None


def connect(execution) -> str:
    """Connect this process to the cluster (once; later calls reuse the connection); the address connected to,
    or "local" for a local Ray started here."""
    import ray

    with _lock:
        if ray.is_initialized():
            return ray.get_runtime_context().gcs_address
        address = address_of(execution)
        if address:
            check_answers(address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as err:
                raise ClusterUnreachable(f"execution.ray_address: cannot join the Ray cluster at {address!r}: "
                                         f"{str(err).splitlines()[0]}") from None
            log.info("joined the Ray cluster at %s", address)
            return address
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        # the stages this process starts as processes of their own (side by side) join this Ray, not one of theirs
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        log.info("started a local Ray for this run (%s)", ray.cluster_resources())
        return "local"


def worker_env() -> dict[str, str]:
    """The variables a stage's Ray workers set before running it (`FORWARDED_PREFIXES`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def node_capacities() -> list[dict[str, float]]:
    """The resources of each live node of the connected cluster (`CPU`, `GPU`, `accelerator_type:A100`, ...)."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
