"""Where a registered version came from: the git revision of the code, and the DVC hashes of its data splits and
model folder read from a dvc.lock (read without DVC itself, so a stage that `dvc repro` runs can read them);
`kd lineage` prints them, `kd checkout` restores those files (`kd_core.pipeline.dvc.checkout`).
"""

from __future__ import annotations

from pathlib import Path


def git_revision(root: Path | None = None) -> dict[str, str]:
    """{"commit": sha or "", "dirty": "true" | "false" | ""} of the git checkout at `root` (cwd by default)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root or Path.cwd(), capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else ""
    return {"commit": commit, "dirty": ("true" if dirty else "false") if commit else ""}


def lock_outputs(lock_text: str) -> dict[str, dict[str, str]]:
    """stage -> {output path: DVC hash} from the text of a dvc.lock."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: a large dvc.lock parses ~10x faster
    stages = (yaml.load(lock_text, Loader=loader) or {}).get("stages", {})  # noqa: S506 (a safe loader)
    return {name: {o["path"]: o.get("md5") or o.get("hash", "") for o in body.get("outs", [])}
            for name, body in stages.items()}


def _md5(path: Path) -> str:
    from kd_core.io import file_digest

    return file_digest(path, "md5")  # DVC's content hash, not a security use


def matches_workspace(root: Path, path: str, dvc_hash: str) -> bool:
    """The file or folder at `path` holds what dvc.lock says (a folder: every file of its manifest in the DVC
    cache, by name and md5). Read without DVC's repo lock, so a stage run by `dvc repro` can call it."""
    import json

    target = Path(root) / path
    if not dvc_hash.endswith(".dir"):
        return target.is_file() and _md5(target) == dvc_hash
    manifest = Path(root) / ".dvc" / "cache" / "files" / "md5" / dvc_hash[:2] / dvc_hash[2:]
    if not target.is_dir() or not manifest.is_file():
        return False
    entries = json.loads(manifest.read_text())
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    return files == sorted(e["relpath"] for e in entries) and all(
        _md5(target / e["relpath"]) == e["md5"] for e in entries)


def version_lineage(root: Path, lock_text: str, run_dir: str, model_stage: str) -> dict[str, str]:
    """The DVC hashes a registered model version came from: its data splits and eval sets (the prepare
    stage's outputs) and its model folder (the output of `model_stage`), as `data:<path>` / `model:<path>`.
    Empty when dvc.lock does not describe the files in the workspace (a run that DVC did not record)."""
    outs = lock_outputs(lock_text)
    data = {path: h for path, h in outs.get("prepare", {}).items() if not path.endswith("report.json")}
    model = {path: h for path, h in outs.get(model_stage, {}).items() if path.startswith(f"{run_dir}/models/")}
    found = {f"data:{path}": h for path, h in data.items()} | {f"model:{path}": h for path, h in model.items()}
    if not data or not model or not all(matches_workspace(root, k.split(":", 1)[1], h) for k, h in found.items()):
        return {}
    return found


def read_lock(root: Path | None = None) -> str | None:
    """The text of `dvc.lock` at `root` (cwd by default); None when there is none (a run DVC does not record). In a
    flow, its background commits are in it once `kd_core.pipeline.dvc.settle_commits` has returned."""
    lock = Path(root or Path.cwd()) / "dvc.lock"
    return lock.read_text(encoding="utf-8") if lock.is_file() else None
