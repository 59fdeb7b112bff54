"""Which tokenizer each model of a pipeline reads, as far as params tell (no file is opened: `kd validate` stays
light), and the rule that a method comparing teacher and student token by token needs them to be one.

A model's tokenizer source (`tokenizer_source`): its `model.tokenizer` when given; else a checkpoint's own files;
else, for a model cut `from_teacher_layers`, its teacher's; else (built from `config`) the run's shared tokenizer,
which is the teacher checkpoint's (the teacher's `model.tokenizer` if it names one) or, with a teacher built from
config, the byte-level BPE `prepare` trains (`RUN_BPE`). Only a difference that a `model.tokenizer` key makes is
refused here: two checkpoints may well share one tokenizer (SmolLM2-135M and -360M do), which only their files
tell: the distill stage's preflight compares them (`kd_core.training.preflight.check_vocab_compatible`).
"""

from __future__ import annotations

from typing import NamedTuple

from kd_core.config.base import PipelineConfigLike

RUN_BPE = "the run's BPE (trained by prepare)"


class TokenizerSource(NamedTuple):
    source: str  # a tokenizer folder / hub name, a checkpoint, or RUN_BPE
    key: str | None  # the `model.tokenizer` key that named it (None: a checkpoint's own or the run's BPE)


def _model_key(cfg: PipelineConfigLike, name: str) -> str:
    return "teacher" if name == cfg.teacher.name else f"students.{name}"


def tokenizer_source(cfg: PipelineConfigLike, name: str) -> TokenizerSource:
    """Where model `name` (the teacher or a student) gets its tokenizer from (see the module docstring)."""
    is_teacher = name == cfg.teacher.name
    src = cfg.teacher.model if is_teacher else cfg.students[name].model
    if src.tokenizer is not None:
        return TokenizerSource(src.tokenizer, f"{_model_key(cfg, name)}.model.tokenizer")
    if src.checkpoint is not None:
        return TokenizerSource(src.checkpoint + (f" ({src.gguf_file})" if src.gguf_file else ""), None)
    if src.from_teacher_layers is not None:
        return tokenizer_source(cfg, cfg.students[name].teacher)
    return run_tokenizer_source(cfg)


def run_tokenizer_source(cfg: PipelineConfigLike) -> TokenizerSource:
    """The run's shared tokenizer (what `prepare` writes to `<run_dir>/tokenizer`): the teacher checkpoint's, else
    the BPE trained on the train split (a teacher built from config with its own `tokenizer` keeps it to itself)."""
    served = cfg.is_served(cfg.teacher.name)  # (a served teacher's `tokenizer` is the run's)
    return tokenizer_source(cfg, cfg.teacher.name) if cfg.teacher.model.checkpoint or served \
        else TokenizerSource(RUN_BPE, None)


def check_shared_vocabulary(cfg: PipelineConfigLike) -> None:
    """A student whose method compares teacher and student distributions over one vocabulary (every method with a
    teacher that is not `cross_tokenizer`) has its teacher's tokenizer, where a `model.tokenizer` key makes them
    differ. ValueError naming the student's method key, the tokenizer key and the methods that distil across
    tokenizers."""
    from kd_core.config.methods import METHOD_SPECS

    for name, st in cfg.students.items():
        spec = METHOD_SPECS[st.method]
        if not spec.needs_teacher or spec.cross_tokenizer:
            continue
        for teacher in st.teacher_weights() if hasattr(st, "teacher_weights") else {st.teacher: 1.0}:
            own, theirs = tokenizer_source(cfg, name), tokenizer_source(cfg, teacher)
            if own.source == theirs.source or not (own.key or theirs.key):
                continue
            across = ", ".join(sorted(n for n, m in METHOD_SPECS.items() if m.cross_tokenizer))
            no_teacher = ", ".join(sorted(n for n, m in METHOD_SPECS.items() if not m.needs_teacher))
            key = own.key or theirs.key
            raise ValueError(f"students.{name}.method: {st.method!r} compares teacher and student token by token, "
                             f"but {key} makes their tokenizers differ (student: {own.source!r}, teacher "
                             f"{teacher!r}: {theirs.source!r}); methods that distil across tokenizers: {across} "
                             f"(without a teacher: {no_teacher})")
