"""Loading ``pep.yaml``: YAML with the line of every field, ``${ENV}`` interpolation, then the models.

Loading does, in order: read the file, compose the YAML (keeping each node's line), interpolate
``${ENV_VAR}`` / ``${ENV_VAR:-default}`` / ``${file:PATH}`` in string scalars, validate with
pydantic (unknown keys are errors), resolve relative paths against the config file's folder,
compile the route table, and (unless offline) check that the TLS files load.  Every failure is
a :class:`~vvault_pep.errors.ConfigError` whose message reads ``FILE:LINE: field.path: what is
wrong``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .models import _ENV_REF, Config, _Model
from .templates import TemplateError, parse_template


class _Located:
    """YAML → Python while remembering the line of every field path."""

    def __init__(self, filename: str, *, offline: bool = False) -> None:
        self.filename = filename
        self.offline = offline
        self.lines: dict[tuple[str | int, ...], int] = {}
        self.nodes = 0

    def _refuse(self, node: yaml.Node, path: tuple[str | int, ...], message: str) -> ConfigError:
        field = _dotted(path) or "(top level)"
        return ConfigError(f"{self.filename}:{node.start_mark.line + 1}: {field}: {message}")

    def build(self, node: yaml.Node, path: tuple[str | int, ...] = ()) -> Any:
        self.lines[path] = node.start_mark.line + 1
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            # Aliases of aliases ("billion laughs") expand exponentially: stop early.
            raise self._refuse(node, path, f"more than {_MAX_NODES} values once YAML aliases are expanded")
        if node.tag not in _PLAIN_TAGS:
            # Only plain YAML: no !custom or !!python/... tags, no !!binary, !!set, !!omap.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise self._refuse(node, path, f"YAML tag {tag} is not accepted (write a plain value)")
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                    raise self._refuse(key_node, path, "a key must be a plain string (no lists, mappings or tags)")
                key = key_node.value
                if key in out:
                    raise ConfigError(
                        f"{self.filename}:{key_node.start_mark.line + 1}: {_dotted((*path, key))}: key appears twice"
                    )
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        if node.tag == _TIMESTAMP_TAG:
            return node.value  # a date-like scalar stays the text it is
        try:
            value = yaml.SafeLoader(" ").construct_object(node)
        except (ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
            # An explicit tag on a value it cannot hold (!!int 'abc', !!float 'x').
            raise self._refuse(node, path, f"not a valid {node.tag.rsplit(':', 1)[-1]}: {node.value!r}") from exc
        if isinstance(value, str):
            value = self._interpolate(value, path)
        return value

    def _interpolate(self, text: str, path: tuple[str | int, ...]) -> str:
        def sub(match: re.Match[str]) -> str:
            secret_file, name, default = match.group(1), match.group(2), match.group(3)
            if secret_file is not None:
                # ${file:/path}: a secret mounted as a file (Kubernetes Secret volume)
                if self.offline:
                    return "offline-placeholder-" + "x" * 32
                try:
                    return Path(secret_file).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(self.where(path, f"cannot read {secret_file}: {exc.strerror}")) from None
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(self.where(path, f"environment variable ${{{name}}} is not set"))

        return _ENV_REF.sub(sub, text)

    def line_of(self, loc: tuple[str | int, ...]) -> int | None:
        for cut in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:cut]))
            if line is not None:
                return line
        return None

    def where(self, loc: tuple[str | int, ...], message: str) -> str:
        line = self.line_of(loc)
        place = f"{self.filename}:{line}" if line else self.filename
        field = _dotted(loc) or "(top level)"
        return f"{place}: {field}: {message}"


_MAX_NODES = 100_000
_STR_TAG = "tag:yaml.org,2002:str"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
)


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_config(path: str | os.PathLike[str], *, offline: bool = False) -> Config:
    """Load and validate ``path``; raise ConfigError naming file, line and field."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{file}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc}") from exc
    return parse_config(text, filename=str(file), base_dir=file.resolve().parent, offline=offline)


def parse_config(
    text: str, *, filename: str = "<string>", base_dir: Path | None = None, offline: bool = False
) -> Config:
    located = _Located(filename, offline=offline)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        if mark is not None:
            line = mark.line + 1
        elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses (NUL, a lone surrogate)
            line = text.count("\n", 0, exc.position) + 1
        else:
            line = 1
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(f"{filename}:{line}: (top level): not valid YAML: {' '.join(str(problem).split())}") from exc
    if node is None:
        raise ConfigError(f"{filename}: config file is empty")
    data = located.build(node)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{filename}:1: the config must be a mapping of sections")
    data = {**data, "source": filename}
    try:
        config = Config.model_validate(
            data, context={"base_dir": base_dir, "defer_cross_checks": True, "offline": offline}
        )
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            problems.append(located.where(loc, _message(err)))
        raise ConfigError("\n".join(problems)) from None
    problems = [located.where(loc, message) for loc, message in config.problems()]
    if problems:
        raise ConfigError("\n".join(problems))
    # Compile the route table now so a bad template fails at load, with its line.
    for i, route in enumerate(config.routes):
        try:
            parse_template(route.path)
        except TemplateError as exc:
            raise ConfigError(located.where(("routes", i, "path"), str(exc))) from None
    if not offline:
        # Files that exist but do not load are a bad config (exit 2), not a start failure.
        from .tls import tls_file_problem

        for section, tls in (("listener", config.listener.tls), ("admin", config.admin.tls)):
            problem = tls_file_problem(tls) if tls is not None else None
            if problem is not None:
                field, why = problem
                parts = (section, "tls", *field.replace("]", "").split("["))
                where = tuple(int(p) if p.isdigit() else p for p in parts)
                raise ConfigError(located.where(where, why))
    return config


def _field_names() -> list[str]:
    """Every key any section knows, for "did you mean …"."""
    names: set[str] = set()
    pending: list[type[_Model]] = list(_Model.__subclasses__())
    while pending:
        model = pending.pop()
        names.update(model.model_fields)
        pending.extend(model.__subclasses__())
    return sorted(names)


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        loc = err.get("loc") or ()
        key = loc[-1] if loc else ""
        close = difflib.get_close_matches(str(key), _field_names(), n=1, cutoff=0.75)
        if close:
            return f"unknown key (did you mean '{close[0]}'?)"
        return "unknown key (check its spelling and section)"
    if kind == "missing":
        return "required field is missing"
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")
