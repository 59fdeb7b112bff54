"""A run folder and what every stage reads from it: where each output lives (`RunPaths`), the loaders the
stages share (tokenizer, encoded training set, finished models), each failing with the stage to run first
when its input does not exist yet. The lock that keeps two pipelines out of one folder: kd_core/pipeline/lock.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kd_core.config import PipelineConfig
from kd_core.errors import MissingInput


@dataclass(frozen=True)
class RunPaths:
    """Where every output of a run lives: all under `cfg.run_dir`, one folder per kind of output."""

    root: Path

    @classmethod
    def of(cls, cfg: PipelineConfig) -> RunPaths:
        return cls(Path(cfg.run_dir))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """A split (train / val / test) or a transfer set, by name."""
        return self.data / f"{name}.jsonl"

    def eval_set(self, name: str) -> Path:
        return self.split("test") if name == "test" else self.data / "eval" / f"{name}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, name: str) -> Path:
        """The final model of the teacher or of a student (what is evaluated, registered, and teaches TAs' students)."""
        return self.root / "models" / name

    def distilled(self, student: str) -> Path:
        """A student after distillation, before post-distillation fine-tuning."""
        return self.root / "distilled" / student

    def teacher_cache(self, student: str) -> Path:
        """The teacher's cached top-k log-probs over a student's training data (kd_core/teachers/cache.py)."""
        return self.root / "teacher_cache" / student

    def train_info(self, model: str) -> Path:
        return self.root / "train_info" / f"{model}.json"

    def metrics(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.json"

    def generations(self, name: str) -> Path:
        return self.root / "generations" / name

    @property
    def data_report(self) -> Path:
        return self.data / "report.json"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def training_seed(cfg: PipelineConfig, seed: int | None) -> int:
    """A training section's own seed, else the pipeline's."""
    return cfg.seed if seed is None else seed


def n_positions(cfg: PipelineConfig) -> int:
    """Positions a model built from a config needs: the longest prompt plus the longest generation."""
    longest = max([cfg.evaluation.generation.max_new_tokens, *cfg.evaluation.exaccerr_lengths,
                   *(t.max_new_tokens for t in cfg.transfer_sets.values())])
    return cfg.tokenizer.max_length + longest


def require(path: Path, what: str, stage: str) -> Path:
    """`path` if it exists, else a MissingInput naming the stage that makes it."""
    if not path.exists():
        raise MissingInput(f"{path}: no {what} yet; run the {stage} stage first")
    return path


def data_version(paths: RunPaths) -> str:
    """The hash of the train/val/test splits, written by the prepare stage."""
    return json.loads(require(paths.data_report, "data report", "prepare").read_text())["data_version"]


def load_run_tokenizer(paths: RunPaths):
    """The run's tokenizer (built by the prepare stage)."""
    from kd_core.data.tokenize import load_tokenizer

    return load_tokenizer(require(paths.tokenizer, "tokenizer", "prepare"))


def load_model_tokenizer(paths: RunPaths, name: str, folder: Path | None = None):
    """The tokenizer of a model of this run: the one its training stage saved beside it in `folder` (default its final
    folder, `paths.model(name)`): its own when it has one (`model.tokenizer`, a checkpoint's, across tokenizers),
    else a copy of the run's; the run's when the folder has none."""
    from kd_core.data.tokenize import load_tokenizer

    folder = paths.model(name) if folder is None else folder
    if (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder)
    return load_run_tokenizer(paths)


def load_source_tokenizer(cfg: PipelineConfig, source, key: str):
    """A model's own tokenizer: its `tokenizer` (`key`: that key's path, for errors), else a checkpoint's files (None
    when it has none, or for a model built from config without `tokenizer`), made ready as `prepare` makes the run's:
    a pad token, the template's chat template when it has none, and for a model built from config the context length
    of such models. Loaded from local files / the hub cache only (the pipeline runs offline)."""
    from kd_core.data.template import chat_template
    from kd_core.data.tokenize import load_tokenizer
    from kd_core.errors import ModelError

    name = source.tokenizer or source.checkpoint
    if name is None:
        return None
    try:
        tok = load_tokenizer(name, source.trust_remote_code, gguf_file=None if source.tokenizer else source.gguf_file)
    except (OSError, ValueError) as err:
        if source.tokenizer is None:  # a checkpoint without tokenizer files
            return None
        missing = name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()
        raise ModelError(f"{key}: {name!r} " + ("does not exist" if missing else f"does not load as a tokenizer "
                                                                              f"({err})")) from None
    if source.config is not None:
        tok.model_max_length = n_positions(cfg)
    if tok.chat_template is None:
        tok.chat_template = chat_template(cfg.data.template)
    return tok


def load_student_tokenizer(cfg: PipelineConfig, paths: RunPaths, student_cfg):
    """The tokenizer a student trains with: its `model.tokenizer`; a checkpoint's own when its method distils across
    tokenizers (`uld`, `gold`) or reads no teacher distribution (`sft`, `seqkd`: text only, so a checkpoint of
    another family keeps its tokenizer), else the run's, which must then equal it (preflight checks); its teacher's
    when cut `from_teacher_layers`; else (built from config) the run's."""
    from kd_core.config.methods import METHOD_SPECS

    src, spec = student_cfg.model, METHOD_SPECS[student_cfg.method]
    if src.from_teacher_layers is not None:
        return load_model_tokenizer(paths, student_cfg.teacher)
    own_checkpoint = spec.cross_tokenizer or not spec.needs_teacher
    if src.tokenizer is not None or (own_checkpoint and src.checkpoint is not None):
        own = load_source_tokenizer(cfg, src, f"students.{student_cfg.name}.model.tokenizer")
        if own is not None:
            return own
    return load_run_tokenizer(paths)


def read_split(paths: RunPaths, split: str) -> list[dict]:
    """The rows of a split (train / val / test) or a transfer set; MissingInput naming the stage that writes it."""
    from kd_core.io import read_jsonl

    maker = "prepare" if split in ("train", "val", "test") else f"transfer (--model {split})"
    return read_jsonl(require(paths.split(split), f"data {split!r}", maker))


def load_train_set(cfg: PipelineConfig, paths: RunPaths, tokenizer, split: str = "train", loss_on_prompt: bool = False,
                   teacher_tokenizer=None, with_offsets: bool = False):
    """A split or transfer set read and encoded for training (:func:`kd_core.data.training_set.encode_training_set`):
    (EncodedDataset, rows dropped as overlong); with `teacher_tokenizer` (cross-tokenizer methods) encoded under the
    student's and the teacher's tokenizers at once, (PairedDataset, rows dropped on either side)."""
    from kd_core.data.training_set import encode_training_set

    return encode_training_set(cfg, read_split(paths, split), split, tokenizer, loss_on_prompt, teacher_tokenizer,
                               with_offsets)


def load_model(paths: RunPaths, name: str):
    """A finished model of this run (the teacher or a student acting as teacher assistant)."""
    from kd_core.models.build import load_checkpoint

    return load_checkpoint(require(paths.model(name), f"model {name!r}", "training stages of that model (train_teacher "
                                                                            "or distill + finetune)"))


def is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `deepspeed` launch (both set RANK), or a single process: the one that writes
    outputs (models, metrics, train_info, MLflow runs)."""
    return int(os.environ.get("RANK", "0")) == 0
