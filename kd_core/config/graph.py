"""The model graph of a pipeline: which model teaches which student, which model generates which transfer
set. Edges point from a student to the models it needs finished first (`dependencies`); every chain must end
at the teacher. `chain_order` walks the graph once, depth first: it orders the students and finds cycles.

Validators call these with a `PipelineConfig` whose sections are already valid; they raise `ValueError`
with a message that starts with the key path (`students.b.teacher: ...`).
"""

from __future__ import annotations

from kd_core.config.base import PipelineConfigLike

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"  # the unlabeled prompt pool (data/unlabeled.jsonl): a data set name, not a transfer set


def check_references(cfg: PipelineConfigLike) -> None:
    """Every name that points at a model or a data set names one that exists: a student's teacher (not
    itself), a transfer set's source and prompts (unlabeled ones only when the data has them), a student's
    train_data (a transfer set when its method needs one)."""
    from kd_core.config.methods import METHOD_SPECS

    names = list(cfg.students)
    if cfg.teacher.name in names:
        raise ValueError(f"students: name {cfg.teacher.name!r} is the teacher's")
    models = [cfg.teacher.name, *names]
    for name, ts in cfg.transfer_sets.items():
        if name in (*SPLITS, UNLABELED):
            raise ValueError(f"transfer_sets.{name}: reserved name (train, val, test are the splits, unlabeled the "
                             f"unlabeled prompts)")
        if ts.source not in models:
            raise ValueError(f"transfer_sets.{name}.source: unknown model {ts.source!r} (allowed: {', '.join(models)})")
        if ts.hardness == "gap" and ts.source not in cfg.students:
            raise ValueError(f"transfer_sets.{name}.hardness: 'gap' is the source's loss minus its teacher's, so the "
                             f"source must be a student (got the teacher {ts.source!r}; allowed with it: loss)")
        if ts.prompts != "train" and not cfg.data.has_unlabeled:
            raise ValueError(f"transfer_sets.{name}.prompts: {ts.prompts!r} needs unlabeled prompts: set "
                             f"data.builtin_unlabeled (source builtin) or data.unlabeled (allowed without: train)")
    for name, st in cfg.students.items():
        if st.teacher not in models or st.teacher == name:
            allowed = ", ".join(m for m in models if m != name)
            raise ValueError(f"students.{name}.teacher: unknown model {st.teacher!r} (allowed: {allowed})")
        for other in st.teachers or {}:
            if other not in models or other == name:
                allowed = ", ".join(m for m in models if m != name)
                raise ValueError(f"students.{name}.teachers.{other}: unknown model (allowed: {allowed})")
        if METHOD_SPECS[st.method].needs_transfer_set and st.train_data == "train":
            allowed = ", ".join(cfg.transfer_sets) or "none defined under transfer_sets"
            raise ValueError(f"students.{name}.train_data: method {st.method!r} trains on a transfer set "
                             f"(allowed: {allowed})")
        if st.train_data != "train" and st.train_data not in cfg.transfer_sets:
            allowed = ", ".join(["train", *cfg.transfer_sets])
            raise ValueError(f"students.{name}.train_data: unknown data {st.train_data!r} (allowed: {allowed})")


def dependencies(cfg: PipelineConfigLike, student: str) -> list[str]:
    """The models a student needs finished first: its teacher(s) and the source of its transfer set."""
    st = cfg.students[student]
    deps = [st.teacher, *(t for t in st.teachers or {} if t != st.teacher)]
    if st.train_data in cfg.transfer_sets:
        deps.append(cfg.transfer_sets[st.train_data].source)
    return deps


def ancestors(cfg: PipelineConfigLike, model: str) -> set[str]:
    """Every model `model` needs finished first, directly or through others (none for the teacher)."""
    found: set[str] = set()
    todo = [model]
    while todo:
        name = todo.pop()
        for dep in dependencies(cfg, name) if name in cfg.students else ():
            if dep not in found:
                found.add(dep)
                todo.append(dep)
    return found


def check_teachers(cfg: PipelineConfigLike) -> None:
    """A student's `teachers` (several teachers, kd_core/teachers/ensemble.py) name its `teacher` and models that come
    before it in its chain: dvc.yaml's stages depend on `teacher` alone (a foreach over the students has one
    path per student), so the other teachers reach the student through it. Call after `chain_order` (no cycles)."""
    from kd_core.config.endpoint import check_served_teacher

    check_served_teacher(cfg)  # a teacher served by another process: who may be taught by it, and how
    for name, st in cfg.students.items():
        if not st.teachers:
            continue
        nearest = [t for t in st.teachers if set(st.teachers) - {t} <= ancestors(cfg, t)]
        if not nearest:
            raise ValueError(f"students.{name}.teachers: {', '.join(map(repr, st.teachers))} are not in one chain "
                             f"(dvc.yaml's stages depend on one teacher per student, students.{name}.teacher: each "
                             f"other teacher must be a model it is taught by, directly or through others)")
        if st.teacher != nearest[0]:
            raise ValueError(f"students.{name}.teacher: must be {nearest[0]!r}, the nearest of students.{name}."
                             f"teachers (dvc.yaml's stages depend on `teacher`; the others come before it; "
                             f"got {st.teacher!r})")


def chain_order(cfg: PipelineConfigLike) -> list[str]:
    """Student names, each after the models it depends on (a post-order depth-first walk, students in params
    order). A model met again while its own dependencies are being walked closes a cycle: ValueError
    `students.<first>.teacher: cycle a -> b -> a`, the path from the student the walk started at."""
    done: list[str] = []
    path: list[str] = []

    def visit(name: str) -> None:
        if name == cfg.teacher.name or name in done:
            return
        if name in path:
            raise ValueError(f"students.{path[0]}.teacher: cycle {' -> '.join([*path, name])}")
        path.append(name)
        for dep in dependencies(cfg, name):
            visit(dep)
        path.pop()
        done.append(name)

    for name in cfg.students:
        visit(name)
    return done


def layer_counts(cfg: PipelineConfigLike) -> dict[str, int | None]:
    """Decoder layers of each model, where params tell: `config.n_layer`, or the number of layers a student
    keeps with `from_teacher_layers`; None for a checkpoint (known only once loaded)."""
    counts: dict[str, int | None] = {}
    sources = {cfg.teacher.name: cfg.teacher.model} | {name: st.model for name, st in cfg.students.items()}
    for name, source in sources.items():
        if source.config is not None:
            counts[name] = source.config.n_layer
        elif source.from_teacher_layers is not None:
            counts[name] = len(source.from_teacher_layers)
        else:
            counts[name] = None
    return counts


def check_layer_indices(cfg: PipelineConfigLike) -> None:
    """`from_teacher_layers` indices exist in the model that teaches the student (the teacher, or the
    student that teaches it in a teacher-assistant chain), where its layer count is known from params."""
    counts = layer_counts(cfg)
    for name, st in cfg.students.items():
        layers, available = st.model.from_teacher_layers, counts[st.teacher]
        if layers is None or available is None:
            continue
        if beyond := [i for i in layers if i >= available]:
            raise ValueError(f"students.{name}.model.from_teacher_layers: indices {beyond} beyond the {available} "
                             f"layers of {st.teacher!r} (allowed: 0 to {available - 1})")
