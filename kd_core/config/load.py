"""Reading `params.yaml` into a `PipelineConfig`: YAML (a key given twice is an error), dotted overrides
(`-S a.b.0=v`), the credentials scan, and validation errors as one line per problem naming file and key:

    params.yaml: students.fkl.method: unknown method 'fkd' (allowed: kd, sft)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from kd_core.config.schema import PipelineConfig
from kd_core.errors import ConfigError

# ----------------------------------------------------------------------------------------------- YAML
MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeys(yaml.YAMLError):
    """Keys given twice in one mapping; `problems` holds one `<key path>: duplicate key (lines a and b)` each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping raises `DuplicateKeys` (plain YAML
    keeps the later value silently: a second `students:` block would replace the first), and that `1e-3` is a
    number (YAML 1.2; PyYAML follows YAML 1.1, where a float needs a dot and `1e-3` is the string "1e-3", which
    the strict config would refuse). Anchors, aliases and merge keys (`<<: *base`, whose keys an explicit key
    may override) work as in SafeLoader."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        problems = duplicate_keys(node)
        if problems:
            raise DuplicateKeys(problems)
        return self.construct_document(node)


UniqueKeyLoader.add_implicit_resolver(  # an exponent without a dot (1e-3, 5E+4): the other floats resolve as before
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def yaml_value(text: str) -> Any:
    """A YAML document as params.yaml is read (also each `--set key=VALUE`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def duplicate_keys(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> list[str]:
    """`<key path>: duplicate key (lines a and b)` for each scalar key given twice in a mapping of the tree
    (lines 1-based; merge keys `<<` are not keys). An aliased node is walked once."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if key.tag == MERGE_TAG:
                problems += duplicate_keys(value, path, seen)
                continue
            label = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            sub = f"{path}.{label}" if path else label
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first_line:
                    problems.append(f"{sub}: duplicate key (lines {first_line[key.tag, key.value]} and {line})")
                first_line.setdefault((key.tag, key.value), line)
            problems += duplicate_keys(value, sub, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += duplicate_keys(item, f"{path}[{i}]", seen)
    return problems


def read_yaml(path: Path) -> Any:
    """The YAML document of a file; ConfigError for a missing file, bad YAML or a duplicate key."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x})") from None
    try:
        return yaml_value(text)
    except DuplicateKeys as err:
        raise ConfigError("\n".join(f"{path}: {p}" for p in err.problems)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: `line L, column C: not valid YAML: <problem> (<context>)` (its own message
    spans several lines, with a caret drawing, and calls the file "<unicode string>")."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{where}not valid YAML: {problem}" + (f" ({context})" if context else "")


# ----------------------------------------------------------------------------------------------- overrides
def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts and lists (list indices as numbers, like `dvc exp run -S`); a missing
    mapping key on the way is created. The last part is the one assigned, wherever equal parts repeat."""
    node: Any = raw
    parts = dotted.split(".")
    for i, key in enumerate(parts):
        is_last = i == len(parts) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {key!r} is not an index of a list of {len(node)}")
            if is_last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if is_last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"override {dotted!r}: cannot descend into a {type(node).__name__} at {key!r}")


# ----------------------------------------------------------------------------------------------- secrets
# Credentials never go in params.yaml: it is committed, hashed into tags and logged as MLflow params.
SECRET_WORDS = {"password", "passwd", "secret", "token", "apikey", "credential", "credentials"}
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
SECRET_HINT = ("set credentials in the environment instead (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, HF_TOKEN)")


def _looks_secret(key: str) -> bool:
    parts = re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", key.strip())
    parts = [p.lower() for p in parts if p]
    return bool(SECRET_WORDS & set(parts)) or any(pair in SECRET_PAIRS for pair in zip(parts, parts[1:]))


def find_secrets(raw: Any, path: str = "") -> list[str]:
    """Keys that look like credentials and URLs with a password (`scheme://user:pass@host`), by key path."""
    found = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if _looks_secret(str(key)):
                found.append(f"{sub}: looks like a credential; {SECRET_HINT}")
            else:
                found += find_secrets(value, sub)
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            found += find_secrets(value, f"{path}[{i}]")
    elif isinstance(raw, str) and "://" in raw:
        try:
            has_password = urlsplit(raw).password is not None
        except ValueError:
            has_password = False
        if has_password:
            found.append(f"{path}: URL contains a password (user:password@); {SECRET_HINT}")
    return found


# ----------------------------------------------------------------------------------------------- validation
_YAML_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "mapping",
               type(None): "null"}


def format_errors(err: ValidationError, source: str) -> str:
    """One line per pydantic error: `<source>: <key path>: <message>`. A model validator reports at its
    model; its message starts with the sub-key (`method: ...`), which is moved into the path."""
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e['input']!r})"
        elif e["type"].endswith("_type"):  # strict types: the value is named with its YAML type, never converted
            value = repr(e["input"])
            msg = f"{msg} (got {_YAML_TYPES.get(type(e['input']), type(e['input']).__name__)} " \
                  f"{value if len(value) <= 60 else value[:57] + '...'})"
        sub = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg)
        if sub and e["type"] == "value_error":
            loc, msg = (f"{loc}.{sub.group(1)}" if loc else sub.group(1)), sub.group(2)
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "params.yaml") -> PipelineConfig:
    """Validate a loaded params mapping; ConfigError with one line per problem (credentials first)."""
    secrets = find_secrets(raw)
    if secrets:
        raise ConfigError("\n".join(f"{source}: {line}" for line in secrets))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read, override (`{"students.fkl.divergence": "rkl"}`) and validate a params file."""
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    # YAML anchors load as one shared object: un-alias so an override of one student changes only that one
    raw = json.loads(json.dumps(raw, default=str))
    for dotted, value in (overrides or {}).items():
        _names_an_entry(raw, dotted, path)
        set_dotted(raw, dotted, value)
    return parse_config(raw, source=str(path))


def _names_an_entry(raw: dict, dotted: str, source: Path) -> None:
    """An override inside one student or transfer set (`students.<name>.<key>`) names one of the file's: a typo
    would otherwise add a student of that one key. A new one is given whole (`students.<name>={...}`)."""
    section, _, rest = dotted.partition(".")
    name, _, deeper = rest.partition(".")
    entries = raw.get(section)
    if section in ("students", "transfer_sets") and deeper and isinstance(entries, dict) and name not in entries:
        raise ConfigError(f"override {dotted!r}: {name!r} is not one of the {section} of {source} "
                          f"({', '.join(entries) or 'none'}); give a new one whole: {section}.{name}={{...}}")
