"""Command line -> ``Config``: flags generated from the config structs, grouped like Miles's ``--help``.

A bad value exits with status 2 and one line (``launch: error: --lr: must be > 0``) before
anything starts, whether argparse, msgspec or a cross-field rule caught it.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, NoReturn

import msgspec

from policies.engine.sglang_launch import parse_sglang_passthrough
from runtime import config as C


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _base_type(tp: Any) -> Any:
    """Strip Annotated/Optional down to the scalar type argparse should parse."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _base_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def _field_comments(struct: type) -> dict[str, str]:
    """The ``# comment`` after each field in the struct's source: the help text, written once."""
    comments: dict[str, str] = {}
    for line in inspect.getsource(struct).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _add_field(group: argparse._ArgumentGroup, section: str, field: msgspec.structs.FieldInfo,
               comment: str) -> None:
    tp = _base_type(field.type)
    kw: dict[str, Any] = {"dest": f"{section}.{field.name}", "default": argparse.SUPPRESS}
    default = field.default if field.default is not msgspec.NODEFAULT else None
    if field.default_factory is not msgspec.NODEFAULT:
        default = field.default_factory()
    if tp is bool:
        kw["action"] = _BoolFlag
    elif typing.get_origin(tp) is Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif field.name in SPACED_LISTS:  # Miles's spelling: --eval-prompt-data NAME PATH NAME PATH
        kw["nargs"] = "+"
        kw["metavar"] = "NAME PATH"
    elif typing.get_origin(tp) is list:  # comma-separated; msgspec converts and checks the items
        kw["type"] = _comma_list
        kw["metavar"] = "A,B,..."
    else:
        kw["type"] = tp
        kw["metavar"] = tp.__name__.upper()
    help_text = f"{comment} (default: {default})" if comment else f"(default: {default})"
    group.add_argument(C.flag(field.name), help=help_text.replace("%", "%%"), **kw)


SPACED_LISTS = {"eval_prompt_data"}  # list flags given as several words, not A,B,...


class _BoolFlag(argparse.BooleanOptionalAction):
    """``--flag``, ``--no-flag`` or ``--flag false``: launch scripts often spell the value out."""

    WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}

    def __init__(self, option_strings: list[str], dest: str, **kw: Any):
        super().__init__(option_strings, dest, **kw)
        self.nargs, self.metavar = "?", "BOOL"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        negated = bool(option_string and option_string.startswith("--no-"))
        if values is None:
            setattr(namespace, self.dest, not negated)
        elif values.lower() in self.WORDS and not negated:
            setattr(namespace, self.dest, self.WORDS[values.lower()])
        else:
            parser.error(f"{option_string}: expected no value or one of true/false, got {values!r}")


def _comma_list(text: str) -> list[str]:
    """``2,1.5,1.2`` -> ``["2", "1.5", "1.2"]``; an empty string is the empty list."""
    return [item.strip() for item in text.split(",")] if text.strip() else []


def build_parser(prog: str = "launch") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Fully asynchronous RL post-training. Defaults shown are the "
                "fields' own; a recipe (--recipe) may set others, and config.toml in the run directory "
                "records what a run used.")
    p.add_argument("--config", metavar="FILE", help="TOML file, one table per section ([rollout], ...)")
    for section, struct in C.SECTIONS.items():
        group = p.add_argument_group(C.GROUP_TITLES[section], struct.__doc__)
        comments = _field_comments(struct)
        for field in msgspec.structs.fields(struct):
            if typing.get_origin(_base_type(field.type)) is not dict:  # a table: TOML, or --sglang-X for sglang_args
                _add_field(group, section, field, comments.get(field.name, ""))
    return p


def _cli_overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise C.ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise C.ConfigError("--config", f"{path} is not valid TOML: {e}") from None


def resolve(argv: list[str] | None = None, prog: str = "launch") -> C.Config:
    """Parse ``argv`` into a validated ``Config``; exits 2 with one line on any bad value."""
    from launchers.recipes import get_recipe  # recipes live outside the runtime core

    parser = build_parser(prog)
    try:  # --sglang-X [VALUE]: SGLang's own flags, passed through (EngineConfig.sglang_args)
        sglang_args, argv = parse_sglang_passthrough(sys.argv[1:] if argv is None else list(argv))
    except ValueError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    ns = parser.parse_args(argv)
    try:
        cli = _cli_overrides(ns)
        file = _read_toml(ns.config) if ns.config else {}
        if sglang_args:  # added to the file's table, not replacing it
            table = file.get("engine", {}).get("sglang_args", {}) if isinstance(file.get("engine"), dict) else {}
            cli.setdefault("engine", {})["sglang_args"] = {**(table if isinstance(table, dict) else {}), **sglang_args}
        name = cli.get("run", {}).get("recipe") or file.get("run", {}).get("recipe") or "default"
        recipe = get_recipe(name)
        data = C.merge(C.merge(C.merge({}, recipe.defaults), file), cli)
        return C.build(data)
    except C.ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")


def dumps_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Minimal TOML writer for flat tables of scalars and lists of them (all a resolved config holds)."""
    lines: list[str] = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (EngineConfig.sglang_args)
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


if __name__ == "__main__":  # pragma: no cover - convenience: print the resolved config
    sys.stdout.write(dumps_toml(C.to_toml_dict(resolve(sys.argv[1:]))))
