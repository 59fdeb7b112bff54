"""What `kd validate` (and the flow, before its first stage) checks of `execution` against the cluster itself:
Ray is installed, the cluster answers, and each stage's workers fit on its nodes, one line per problem naming
the key, what was asked and what the nodes offer.

A worker fits on a node that has its CPUs, its GPUs and (when asked) its accelerator type; a stage's workers fit
when the nodes hold that many of them at once (Ray would otherwise wait for resources forever). A local Ray
started for the run offers this machine: its CPUs, and the GPUs torch sees.
"""

from __future__ import annotations

import os

from kd_core.pipeline.cluster.connect import address_of, connect, node_capacities
from kd_core.errors import ClusterUnreachable


def _local_capacities(execution) -> list[dict[str, float]]:
    """This machine as a local Ray would see it (torch is imported only when a stage asks for GPUs)."""
    gpus = 0
    if any(r.gpus_per_worker for r in execution.stages.values()):
        import torch

        gpus = torch.cuda.device_count()
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}]


def _fits(node: dict[str, float], resources) -> int:
    """How many workers of `resources` a node holds."""
    if resources.accelerator_type is not None and f"accelerator_type:{resources.accelerator_type}" not in node:
        return 0
    count = int(node.get("CPU", 0.0) // resources.cpus_per_worker)
    if resources.gpus_per_worker:
        count = min(count, int(node.get("GPU", 0.0) // resources.gpus_per_worker))
    return count


def _offer(nodes: list[dict[str, float]]) -> str:
    def one(node: dict[str, float]) -> str:
        types = [k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:")]
        return f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" + (f" ({', '.join(types)})" if types else "")

    return "; ".join(one(n) for n in nodes) or "no live node"


def resource_problems(execution, nodes: list[dict[str, float]]) -> list[str]:
    """One line per stage whose workers the `nodes` cannot hold (empty: every stage fits)."""
    problems = []
    for stage, res in execution.stages.items():
        key = f"execution.stages.{stage}"
        held = sum(_fits(node, res) for node in nodes)
        if not any(_fits(node, res) for node in nodes):
            asked = f"{res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU" + (
                f", accelerator {res.accelerator_type}" if res.accelerator_type else "")
            problems.append(f"{key}: no node offers one worker's resources ({asked}); the nodes offer: {_offer(nodes)}")
        elif held < res.workers:
            problems.append(f"{key}.workers: {res.workers} workers asked, the nodes hold {held} at once "
                            f"(allowed: 1 .. {held}; the nodes offer: {_offer(nodes)})")
    return problems


def cluster_problems(cfg) -> list[str]:
    """Everything `kd validate` reports of `cfg.execution` (engine ray only; nothing for engine local)."""
    execution = cfg.execution
    if execution.engine != "ray":
        return []
    try:
        import ray  # noqa: F401
    except ImportError:
        return ["execution.engine: 'ray' needs Ray, which is not installed: pip install 'kd-pipeline[ray]' "
                "(allowed: local, ray)"]
    if address_of(execution) is None:
        return resource_problems(execution, _local_capacities(execution))
    try:
        connect(execution)
    except ClusterUnreachable as err:
        return [str(err)]
    return resource_problems(execution, node_capacities())
