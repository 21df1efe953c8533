"""Typed YAML + `--set` overrides into the schema's dataclasses; every type error names the
field, the bad value and what is allowed, all errors of a file collected together."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from fedprompt.config.checks import validate
from fedprompt.config.schema import Config
from fedprompt.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a config file or override. Each entry of `problems` is one line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Loading and type checking


class _ShortRepr(reprlib.Repr):
    """repr() bounded in size: a YAML alias bomb or a 5 MB value must not become the error
    message, and an integer past Python's 4300-digit str limit must not raise while shown."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxset = 3, 6, 4, 6
        self.maxstring, self.maxother, self.maxlong = 80, 80, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # also keeps str() away from the digit limit
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


def _show(value: Any, limit: int = 200) -> str:
    """A value as it appears in an error line: its repr, bounded in depth, items and length."""
    text = _ShortRepr().repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


INT_RANGE = (-(2**63), 2**63 - 1)  # what numpy, torch and JSON consumers of the config can hold


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value conversions fail as YAML errors with a position: PyYAML raises a
    bare ValueError for e.g. `2024-13-45` (a timestamp), `!!int abc` or a 5000-digit integer,
    and a KeyError for `!!bool maybe`."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # ValueError, OverflowError, KeyError (`!!bool maybe`), ...
            why = "more than 4300 digits" if "integer string conversion" in str(e) else str(e) or type(e).__name__
            kind = str(node.tag).rsplit(":", 1)[-1]  # int, float, timestamp, ...
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_show(node.value)} as {kind} ({why}); quote it if it is text", node.start_mark
            ) from None


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        problems.append(f"{where}: {_show(value)} is not allowed; expected {_type_name(tp)}")
        return None
    if origin is list:
        if isinstance(value, str):  # `--set peft.lora_target_modules=q_proj,v_proj`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: {_show(value)} is not {_type_name(tp)}")
            return None
        mine: list[str] = []
        items = [_coerce(v, get_args(tp)[0], f"{where}[{i}]", mine) for i, v in enumerate(value)]
        problems.extend(mine[:3])  # a long list of junk is one mistake, not a screenful
        if len(mine) > 3:
            problems.append(f"{where}: {len(mine) - 3} more items are not {_type_name(get_args(tp)[0])}")
        return items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if INT_RANGE[0] <= value <= INT_RANGE[1]:
                return value
            problems.append(f"{where}: {_show(value)} is out of range; expected a 64-bit integer")
            return None
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number.
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer literal too large for a float
                value = math.inf
            if math.isfinite(value):
                return value
            problems.append(f"{where}: {_show(value)} is not a finite number")
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: {_show(value)} is not {_type_name(tp)}")
    return None


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of keys, got {_show(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            shown = key if isinstance(key, str) and key.isidentifier() else _show(key)  # one line, visible
            problems.append(f"{where + '.' if where else ''}{shown}: unknown key; allowed keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], path, problems)
        else:
            value = _coerce(data[name], tp, path, problems)
            if value is not None:
                kwargs[name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError([f"--set {_show(text)}: expected key.path=value, e.g. train.local_steps=50"])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError([f"--set {_show(text)}: the key must name a section and a field, e.g. model.quantization"])
    if _field_type(parts) is str:
        # A string field takes the text as is ("Article: {text}" is not a YAML mapping here),
        # minus one pair of surrounding quotes; a typed \n or \t becomes a newline or tab.
        text_value = raw.strip()
        if len(text_value) >= 2 and text_value[0] == text_value[-1] and text_value[0] in "'\"":
            text_value = text_value[1:-1]
        return parts, text_value.replace("\\n", "\n").replace("\\t", "\t")  # shell-typed escapes
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return parts, value


def _field_type(parts: list[str]) -> Any:
    """The annotated type at `section.field` of Config, or None if there is no such field."""
    cls: Any = Config
    for p in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if p not in hints:
            return None
        cls = hints[p]
    return cls


def _apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or the defaults when `path` is None), apply `key.path=value` overrides,
    type-check and validate. Raises ConfigError listing every problem found."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist; pass an existing YAML file, e.g. configs/bbc-minilm-prompt.yaml"])
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
        except UnicodeDecodeError as e:
            raise ConfigError([f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})"]) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            detail = " ".join(str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).split())
            raise ConfigError([f"config file {str(p)!r} is not valid YAML{at}: {detail}"]) from None
        except RecursionError:
            raise ConfigError([f"config file {str(p)!r} is nested too deeply to be a config"]) from None
        except OSError as e:
            raise ConfigError([f"config file {str(p)!r} cannot be read: {e.strerror or e}"]) from None
        if raw is None:  # an empty file (or only comments): all defaults
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"config file {str(p)!r}: expected a mapping of sections (model:, peft:, ...), got {type(raw).__name__}"])
    for ov in overrides:
        parts, value = parse_override(ov)
        _apply_override(raw, parts, value)
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg
