"""The structure the code promises: layers that import only downwards, no import cycles, small modules, one
declaration per stage from which dvc.yaml, the CLI and the flow follow."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_core.config import load_config
from kd_core.pipeline import dvcfile
from kd_core.pipeline.dag import expand, producers
from kd_core.stages import DECLARATIONS, STAGES, check_key

ROOT = dvcfile.ROOT
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 10

# the layers, low -> high (docs: docs/guide.md "Layout"): a module imports only from its own layer or a lower one
LAYERS: dict[str, int] = {
    "kd_core/__init__.py": 1, "kd_core/errors.py": 1, "kd_core/io.py": 1, "kd_core/env.py": 1,
    "kd_core/progress.py": 1, "kd_core/faults.py": 1,
    "kd_core/config": 2,
    "kd_core/data": 3, "kd_core/losses": 3, "kd_core/models": 3, "kd_core/run.py": 3, "kd_core/generation.py": 3,
    "kd_core/teachers": 4,
    "kd_core/methods": 5,
    "kd_core/training": 6,
    "kd_core/evaluation": 7,
    "kd_core/tracking": 8,
    "kd_core/stages": 9,
    "kd_core/pipeline": 10,
    "flows": 11, "kd_core/cli.py": 11,
}


def _project_files() -> list[Path]:
    return sorted(p for folder in ("kd_core", "flows") for p in (ROOT / folder).rglob("*.py"))


def _import_graph() -> dict[Path, set[Path]]:
    """file -> the project files it imports (anywhere in it, lazily too), each import naming its exact target."""
    graph = {}
    for f in _project_files():
        targets = set()
        for name in dvcfile.imports_of(f):
            target = dvcfile.module_file(name)
            if target is not None and target != f:
                targets.add(target)
        graph[f] = targets
    return graph


def _explicit_edges(graph: dict[Path, set[Path]]) -> dict[Path, set[Path]]:
    """Drop the implicit edges to parent packages (`import a.b.c` runs a/__init__ and a/b/__init__ first):
    a package importing its own submodules is how a package is built, not a cycle."""
    out = {}
    for f, targets in graph.items():
        out[f] = {t for t in targets if not (t.name == "__init__.py" and t.parent in f.parents)}
    return out


def _cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    state: dict[Path, int] = {}
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(path: Path) -> int:
    """The layer of a project file: the longest `LAYERS` entry that is the file or a folder above it."""
    rel = path.relative_to(ROOT).as_posix()
    matches = [key for key in LAYERS if rel == key or rel.startswith(key + "/")]
    assert matches, f"{rel}: in no layer of LAYERS (tests/test_architecture.py)"
    return LAYERS[max(matches, key=len)]


def _every_import(path: Path) -> set[Path]:
    """The project files `path` imports, lazily and `if TYPE_CHECKING:` too (a type-only import is a dependency),
    without the packages that hold them (its own, and those of the modules it imports: a package's __init__.py runs
    first, but the import names the module)."""
    targets = {dvcfile.module_file(name) for name in dvcfile.imports_of(path, typing_too=True)} - {None, path}
    holders = {t for t in targets if t.name == "__init__.py" and any(t.parent in o.parents for o in (targets | {path}) - {t})}
    return targets - holders


def upward_imports(files: list[Path]) -> list[str]:
    """Every import from a lower layer up to a higher one, as `importer (layer) -> imported (layer)`."""
    return [f"{f.relative_to(ROOT)} ({layer_of(f)}) -> {t.relative_to(ROOT)} ({layer_of(t)})"
            for f in files for t in sorted(_every_import(f)) if layer_of(t) > layer_of(f)]


def test_the_layer_rule_finds_an_upward_import(monkeypatch):
    """A stage module importing the pipeline (layer 9 -> 10), at run time or for types only, is reported; the
    stage's own imports (downwards) are not."""
    stage = ROOT / "kd_core/stages/compare.py"
    assert upward_imports([stage]) == []
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from kd_core.pipeline import execute\n")
    assert upward_imports([stage]) == ["kd_core/stages/compare.py (9) -> kd_core/pipeline/execute.py (10)"]
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "if TYPE_CHECKING:\n    import kd_core.pipeline\n")
    assert upward_imports([stage]) == ["kd_core/stages/compare.py (9) -> kd_core/pipeline/__init__.py (10)"]


def test_no_import_from_a_lower_layer_up_to_a_higher_one():
    assert upward_imports(_project_files()) == []


def test_few_modules_at_the_top_of_kd_core():
    loose = sorted(p.name for p in (ROOT / "kd_core").glob("*.py"))
    assert len(loose) <= MAX_TOP_LEVEL_MODULES, loose


def test_cycle_finder_finds_a_cycle():
    a, b, c = Path("a.py"), Path("b.py"), Path("c.py")
    assert _cycle({a: {b}, b: {c}, c: {a}}) == [a, b, c, a]
    assert _cycle({a: {b}, b: {c}, c: set()}) is None


def test_no_import_cycle_in_kd_core_and_flows():
    cycle = _cycle(_explicit_edges(_import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(str(p.relative_to(ROOT)) for p in cycle)


def test_no_stage_imports_another_stage():
    """A file in stages/ is a stage, and no stage imports another one (shared loaders live below them)."""
    stage_files = {ROOT / "kd_core/stages" / f"{s.module_file.rsplit('/', 1)[-1]}" for s in DECLARATIONS}
    crossed = {(str(f.relative_to(ROOT)), str(t.relative_to(ROOT))) for f, targets in _import_graph().items()
               if f in stage_files for t in targets if t in stage_files}
    assert not crossed, f"a stage imports another stage: {sorted(crossed)}"


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in _project_files()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_committed_dvc_yaml_is_generated_from_the_declarations():
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == dvcfile.render(), "run `kd dvc-yaml`"


def test_every_stage_has_its_function_and_code_deps():
    for stage in DECLARATIONS:
        assert callable(stage.function), stage.name
        deps = dvcfile.code_deps(stage)
        assert stage.module_file in deps or any(stage.module_file.startswith(d + "/") for d in deps), stage.name


def test_code_deps_follow_lazy_imports():
    """distill reads the teacher cache through kd_core/teachers/ (whose factory imports the cache inside its
    functions) and no other stage; evaluate imports kd_core.evaluation inside its function."""
    distill_deps = dvcfile.code_deps(STAGES["distill"])
    assert "kd_core/teachers" in distill_deps or "kd_core/teachers/cache.py" in distill_deps
    assert [d for d in distill_deps if d.startswith("kd_core/stages")] == ["kd_core/stages/distill.py"]
    evaluate_deps = dvcfile.code_deps(STAGES["evaluate"])
    assert any(d == "kd_core/evaluation" or d.startswith("kd_core/evaluation/") for d in evaluate_deps)


def test_flow_nodes_are_dvc_stages_with_the_same_dependencies(tmp_path):
    """The flow's nodes for params.yaml are exactly the stages `dvc` lists, and each node waits for the
    nodes whose outputs it reads."""
    from dvc.repo import Repo

    cfg = load_config(ROOT / "params.yaml")
    nodes = expand(cfg)
    with Repo(str(ROOT)) as repo:
        dvc_stages = {s.addressing: s for s in repo.index.stages}
    assert {n.name for n in nodes} == set(dvc_stages)
    for node in nodes:
        stage = dvc_stages[node.name]
        assert sorted(str(o) for o in stage.outs) == sorted(node.outs), node.name
        data_deps = [str(d) for d in stage.deps  # (code deps: dvcfile; params: their own declaration)
                     if not str(d).startswith("kd_core") and type(d).__name__ != "ParamsDependency"]
        assert sorted(data_deps) == sorted(node.deps), node.name
    order = [n.name for n in nodes]
    for node in nodes:
        assert all(order.index(p.name) < order.index(node.name) for p in producers(node, nodes))


def test_per_student_stages_depend_on_their_own_params_only():
    import yaml

    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    for name, body in doc["stages"].items():
        if body.get("foreach") == "${students}":
            assert "students" not in body["do"].get("params", []), name


def test_stage_keys_are_checked_against_the_config():
    cfg = load_config(ROOT / "params.yaml")
    check_key(STAGES["distill"], cfg, "fkl")
    check_key(STAGES["evaluate"], cfg, cfg.teacher.name)
    check_key(STAGES["transfer"], cfg, "augmented")
    with pytest.raises(KeyError, match=r"no student named 'nope' \(allowed: sft, fkl, seqkd\)"):
        check_key(STAGES["distill"], cfg, "nope")
    with pytest.raises(KeyError, match="needs --model"):
        check_key(STAGES["finetune"], cfg, None)
    with pytest.raises(KeyError, match="takes no --model"):
        check_key(STAGES["prepare"], cfg, "fkl")
