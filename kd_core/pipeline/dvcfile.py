"""`dvc.yaml`, generated from the stage declarations (`kd dvc-yaml` writes it; a test keeps the committed file
equal to what the declarations say).

Each stage calls `kd stage NAME [--model KEY]`; a per-student stage is a `foreach` over `students` (a per-model
one adds `<name>_teacher` for the teacher), depends on its own params (`students.${key}`), on the data it reads
and on its code: every file of `kd_core/` that its module imports, directly or through other modules (whole
folders where every file is imported), so a change to code a stage runs makes that stage out of date.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from kd_core.stages import DECLARATIONS, Out, Stage

ROOT = Path(__file__).resolve().parents[2]  # the project: kd_core/ and dvc.yaml live here

HEADER = """\
# Generated from the stage declarations in kd_core/stages/__init__.py by `kd dvc-yaml`: do not edit by hand.
# `dvc repro` reproduces the pipeline (each stage runs `kd stage NAME`); a second `dvc repro` does nothing;
# `dvc exp run -S students.fkl.temperature=2` works; changing one student's params reruns only its stages.
"""

PLOTS = [
    {"size_vs_quality": {"template": "simple", "x": "parameters",
                         "y": {"${run_dir}/reports/plot_points.json": "champion_metric"},
                         "y_label": "tracking.champion.metric"}},
    # one plot per student: top-1 agreement with the teacher per teacher-uncertainty bucket (seeds' Fig. 2/5)
    {"${run_dir}/reports/unc": {"template": "linear", "x": "bucket", "y": "top1_agreement"}},
    "${run_dir}/reports/unc_buckets.png",
    "${run_dir}/reports/size_vs_quality.png",
]

FOREACH = {"student": "${students}", "model": "${students}", "transfer_set": "${transfer_sets}"}


# ----------------------------------------------------------------------------------------------- code deps
def module_file(module: str) -> Path | None:
    """The file of a module of the project (a package's __init__.py), None when it is not one of ours."""
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, typing_too: bool = False) -> set[str]:
    """kd_core modules a file imports when it runs (top level or inside functions; not `if TYPE_CHECKING:`, unless
    `typing_too`), with their parent packages."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = set() if typing_too else {
        id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
        and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
        for n in ast.walk(block)}  # `if TYPE_CHECKING:` imports never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "kd_core":
                parts = name.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    if "pkgutil.iter_modules" in path.read_text(encoding="utf-8"):  # a package that imports all its modules
        found.update(f"{_module_name(path.parent)}.{p.stem}" for p in path.parent.glob("*.py"))
    return found


def _module_name(folder: Path) -> str:
    return ".".join(folder.relative_to(ROOT).parts)


def import_closure(path: Path) -> set[Path]:
    """The files of kd_core that importing `path` runs."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += [m for m in map(module_file, imports_of(f)) if m is not None and m not in seen]
    return seen


def _collapse(files: set[Path]) -> list[str]:
    """Relative paths, a folder in place of its files when every .py file under it is in `files`."""
    chosen = set(files)
    folders = sorted({f.parent for f in files}, key=lambda d: -len(d.parts))
    for d in folders:
        if d == ROOT / "kd_core":
            continue
        inside = set(d.rglob("*.py"))
        if inside and inside <= chosen:
            chosen = (chosen - inside) | {d}
    # a folder may now hold chosen sub-folders: keep the outermost
    result = {c for c in chosen if not any(p in chosen for p in c.parents)}
    return sorted(p.relative_to(ROOT).as_posix() for p in result)


def code_deps(stage: Stage) -> list[str]:
    return _collapse(import_closure(ROOT / stage.module_file))


# ----------------------------------------------------------------------------------------------- dvc.yaml
def _out(out: Out | str) -> str | dict:
    if isinstance(out, str):
        return {out: {"cache": False}}
    opts = ({"cache": False} if not out.cache else {}) | ({"persist": True} if out.persist else {})
    return {out.path: opts} if opts else out.path


def _as_teacher(text: str) -> str:
    return text.replace("${key}", "${teacher.name}").replace("${item.", "${teacher.")


def _body(stage: Stage, teacher: bool = False) -> dict:
    sub = _as_teacher if teacher else (lambda t: t)
    cmd = f"kd stage {stage.name}" + (" --model ${key}" if stage.per else "")
    body: dict = {"cmd": sub(cmd)}
    deps = list(dict.fromkeys(sub(d) for d in stage.deps)) + code_deps(stage)
    if deps:
        body["deps"] = deps
    if stage.params:
        body["params"] = [sub(p) for p in stage.params]
    if stage.outs:
        body["outs"] = [_out(Out(sub(o.path), o.cache, o.persist)) for o in stage.outs]
    if stage.metrics:
        body["metrics"] = [_out(sub(m)) for m in stage.metrics]
    return body


def render() -> str:
    """The text of dvc.yaml for the declared stages."""
    stages: dict = {}
    for stage in DECLARATIONS:
        if stage.per == "model":
            stages[f"{stage.name}_teacher"] = _body(stage, teacher=True)
        if stage.per is None:
            stages[stage.name] = _body(stage)
        else:
            stages[stage.name] = {"foreach": FOREACH[stage.per], "do": _body(stage)}
    doc = {"vars": ["params.yaml"], "stages": stages, "plots": PLOTS}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def write(path: Path = ROOT / "dvc.yaml") -> bool:
    """Write dvc.yaml if it differs from the declarations; True when it changed."""
    from kd_core.io import write_text_atomic

    text = render()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_text_atomic(path, text)
    return True
