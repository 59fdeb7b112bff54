"""The declared stages expanded for one config: one node per stage and key, with its deps and outs resolved
(dvc.yaml's `${...}` templates filled in from the params), ordered so that every node comes after the nodes
that write what it reads. The Prefect flow runs these nodes; DVC names them the same way (`distill@fkl`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kd_core.stages import DECLARATIONS, Stage, stage_keys

_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


@dataclass(frozen=True)
class Node:
    stage: Stage
    key: str | None
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    is_teacher: bool = False  # a per-model stage's node for the teacher (DVC: `<stage>_teacher`)

    @property
    def name(self) -> str:
        """DVC's name of the stage instance: `prepare`, `distill@fkl`, `evaluate_teacher`."""
        return dvc_name(self.stage, self.key, self.is_teacher)


def dvc_name(stage: Stage, key: str | None, is_teacher: bool = False) -> str:
    if key is None:
        return stage.name
    return f"{stage.name}_teacher" if is_teacher else f"{stage.name}@{key}"


def _lookup(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def resolve(template: str, params: dict, key: str | None = None, item: dict | None = None) -> str:
    """Fill in `${run_dir}`, `${teacher.name}`, `${key}`, `${item.field}` (any dotted params key) as DVC does."""
    def value(match: re.Match) -> str:
        ref = match.group(1).strip()
        if ref == "key":
            return str(key)
        if ref.startswith("item."):
            return str(_lookup(item or {}, ref[5:]))
        return str(_lookup(params, ref))
    return _TEMPLATE.sub(value, template)


def _items(stage: Stage, cfg, params: dict) -> list[tuple[str | None, dict | None]]:
    if stage.per is None:
        return [(None, None)]
    out = []
    for key in stage_keys(stage, cfg):
        if stage.per == "transfer_set":
            out.append((key, params["transfer_sets"][key]))
        elif key == cfg.teacher.name:
            out.append((key, params["teacher"]))
        else:
            out.append((key, params["students"][key]))
    return out


def _covers(out: str, dep: str) -> bool:
    """A dep is written by an out when it is that path, inside it, or a folder holding it."""
    o, d = PurePosixPath(out), PurePosixPath(dep)
    return o == d or d in o.parents or o in d.parents


def expand(cfg) -> list[Node]:
    """Every (stage, key) of the config, in an order where each node follows the nodes that write its deps."""
    params = cfg.model_dump(mode="json")
    nodes: list[Node] = []
    for stage in DECLARATIONS:
        for key, item in _items(stage, cfg, params):
            deps = tuple(dict.fromkeys(resolve(d, params, key, item) for d in stage.deps))
            outs = tuple(resolve(o.path, params, key, item) for o in stage.outs) + \
                tuple(resolve(m, params, key, item) for m in stage.metrics)
            nodes.append(Node(stage, key, deps, outs, is_teacher=stage.per == "model" and key == cfg.teacher.name))
    return _topological(nodes)


def producers(node: Node, nodes: list[Node]) -> list[Node]:
    """The nodes that write something `node` reads (never itself)."""
    return [other for other in nodes if other is not node
            and any(_covers(o, d) for o in other.outs for d in node.deps)]


def _topological(nodes: list[Node]) -> list[Node]:
    """Stable topological order: among ready nodes, the declaration order wins."""
    pending = list(nodes)
    done: list[Node] = []
    while pending:
        ready = next((n for n in pending if all(p in done for p in producers(n, nodes))), None)
        if ready is None:
            raise ValueError("stage graph has a cycle: " + ", ".join(n.name for n in pending))
        done.append(ready)
        pending.remove(ready)
    return done
