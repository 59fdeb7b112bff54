"""The flow's DVC bookkeeping, through DVC's Python API: is a stage up to date, record a stage that ran (its outputs
into the DVC cache, `dvc.lock` updated), push to the default remote, restore a registered version's files. The Prefect flow asks before each task and records after it,
so a flow run leaves the same `dvc.lock` as `dvc repro` and either one skips what the other has done.

Bookkeeping is on when the run's config is the project's DVC pipeline: the working directory holds `.dvc/` and
`dvc.yaml`, DVC can open it (a git repository, or `core.no_scm` set), the params file is its `params.yaml`, and
no `--set` override changes it (DVC reads params.yaml only: use `dvc exp run -S` or edit the file). Otherwise
`DvcBook.off(reason)` records nothing and skips nothing; the reason says how to turn it on.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kd")

_LOCK = threading.Lock()  # DVC's Repo is not thread-safe; tasks run in threads
LOCK_WAIT_S = 120.0  # another DVC process (a `dvc status` in a shell) holds the repo lock for seconds at most
# `dvc commit`s of stages that ran, in the background (one thread, in order): the next stage starts meanwhile.
# Whoever reads dvc.lock waits for them first (`settle_commits`: the flow before `register`, and at its end).
_COMMITTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvc-commit")
_PENDING: list[Future] = []
_PENDING_LOCK = threading.Lock()


def local_data_files(cfg) -> list[tuple[str, str]]:
    """(key, path) of every local file the config reads its data from: the data, the eval sets, the unlabeled
    prompts (hub and built-in sources have none)."""
    unlabeled = cfg.data.unlabeled
    return ([("data.path", cfg.data.path)] if cfg.data.source == "file" else []) + \
        [(f"data.eval_sets.{name}.path", es.path) for name, es in cfg.data.eval_sets.items()] + \
        ([("data.unlabeled.path", unlabeled.path)] if unlabeled is not None and unlabeled.path else [])


def untracked_inputs(cfg) -> list[str]:
    """Local data files of the config that DVC does not watch: `prepare` depends on the project's `data/`
    folder (dvc.yaml cannot depend on an optional path), so a file elsewhere can change unnoticed."""
    from kd_core.stages import DATA_DIR

    root = Path.cwd().resolve() / DATA_DIR
    return [f"{key}: {path!r} is outside {DATA_DIR}/: DVC will not see it change (dvc.yaml's prepare depends "
            f"on {DATA_DIR}/); move it there" for key, path in local_data_files(cfg)
            if root not in Path(path).resolve().parents]


@dataclass(frozen=True)
class DvcBook:
    root: Path | None
    reason: str = ""

    @classmethod
    def off(cls, reason: str) -> DvcBook:
        return cls(None, reason)

    @classmethod
    def for_run(cls, params_path: str | Path, overrides: dict | None) -> DvcBook:
        """Bookkeeping for a run of `params_path` (+ overrides) started in the working directory."""
        root = Path.cwd().resolve()
        if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
            return cls.off(f"{root} is not a DVC project (no .dvc/ or dvc.yaml; `dvc init` and `kd dvc-yaml` "
                           "make it one)")
        if Path(params_path).resolve() != root / "params.yaml":
            return cls.off(f"the params file {params_path} is not the DVC pipeline's params.yaml (run with "
                           "params.yaml to record the run)")
        if overrides:
            return cls.off("--set overrides are not in params.yaml (use `dvc exp run -S` to version them)")
        if not _has_scm(root):
            return cls.off(f"{root} is not a git repository (DVC needs one): `git init` here turns it on")
        return cls(root)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _call(self, fn):
        from dvc.lock import LockError
        from dvc.repo import Repo

        logging.getLogger("dvc").setLevel(logging.ERROR)  # "'x/__init__.py' is empty", "Updating lock file": noise
        deadline = time.monotonic() + LOCK_WAIT_S
        with _LOCK:
            while True:
                try:
                    with Repo(str(self.root)) as repo:
                        return fn(repo)
                except LockError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def changes(self, stage: str) -> list:
        """What DVC finds changed for the stage (`dvc status` of it): [] when it is up to date."""
        if not self.enabled:
            return ["DVC bookkeeping off"]
        return self._call(lambda repo: repo.status(targets=[stage])).get(stage, [])

    def changed(self) -> set[str]:
        """Every stage `dvc status` finds changed, in one call (one index build, one hashing pass): the flow
        asks once up front and, for a stage whose producers all stay up to date, needs no second look."""
        if not self.enabled:
            return set()
        status = self._call(lambda repo: repo.status())
        return {name.rsplit(":", 1)[-1] for name in status}  # `dvc.yaml:distill@fkl` in subfolders

    def record(self, stage: str, background: bool = False) -> None:
        """`dvc commit` of the stage: its outputs copied into the DVC cache (the files in the workspace are left as
        they are), its entry in dvc.lock. `background`: queued on the commit thread and returned at once (the
        stage's outputs are final: no later stage writes them); `settle_commits` waits for it and raises its error."""
        if not self.enabled:
            return

        def commit(repo):  # relink=False: DVC would otherwise remove each output and copy it back from its cache,
            # and a stage reading it meanwhile (the next one, while this commit runs behind it) would find nothing
            return repo.commit(stage, force=True, relink=False)
        if not background:
            self._call(commit)
            return
        future = _COMMITTER.submit(self._call, commit)
        with _PENDING_LOCK:
            _PENDING.append(future)

    def push(self) -> str | None:
        """`dvc push` to the default remote, when one is configured: a one-line summary, else None."""
        if not self.enabled:
            return None
        settle_commits()

        def push(repo):
            remote = repo.config.get("core", {}).get("remote")
            if not remote:
                return None
            pushed = repo.push()
            return f"DVC: pushed {pushed} file(s) to remote {remote!r}"
        return self._call(push)


def _has_scm(root: Path) -> bool:
    """DVC can open the project at `root`: it is in a git repository, or DVC is set to work without one
    (`core.no_scm`)."""
    from dvc.repo import Repo
    from dvc.scm import SCMError

    try:
        with Repo(str(root)):
            return True
    except SCMError:
        return False


def settle_commits() -> None:
    """Wait for every background `dvc commit` queued so far (`DvcBook.record(background=True)`); the first one
    that failed raises its error (after all have finished, so dvc.lock holds every commit that could be made)."""
    with _PENDING_LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
    errors = [f.exception() for f in pending]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def checkout(root: Path, lock_text: str, stages: list[str]) -> list[str]:
    """Restore the outputs of `stages` as they were under `lock_text` (a dvc.lock of an earlier run) from the
    DVC cache, fetching from the default remote what the cache lacks. The project's own dvc.lock is left as it
    is (so `dvc status` then shows those outputs as changed: the workspace holds the older version).
    Returns the restored paths."""
    from kd_core.io import write_text_atomic

    book = DvcBook(Path(root))
    lock = Path(root) / "dvc.lock"
    current = lock.read_text(encoding="utf-8") if lock.is_file() else None
    write_text_atomic(lock, lock_text)
    try:
        def restore(repo):
            try:
                repo.fetch(targets=stages)
            except Exception as err:  # noqa: BLE001 (no remote, or offline: the local cache may have it all)
                log.info("DVC fetch skipped: %s", err)
            return repo.checkout(targets=stages, force=True)
        result = book._call(restore)
    finally:
        if current is None:
            lock.unlink(missing_ok=True)
        else:
            write_text_atomic(lock, current)
    return sorted({*result.get("added", []), *result.get("modified", [])})
