"""The experiment flags shared by `run` and `serve`, made from the config model itself: every
config key is a `--flag` (underscores as dashes) with the field's type, description and
allowed values, so a new config key is a new flag with nothing else to add."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from tinyfed.config import IMPORTABLE, REGISTRIES, Config, load_config, parse_set, registry_names

BOOLEAN = object()  # marker: a --flag / --no-flag pair


def flag_type(annotation: Any) -> Any:
    """The argparse type of a field: its own, or the non-None member of an Optional."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return flag_type(members[0])
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    if annotation is bool:
        return BOOLEAN
    return annotation


def flag_help(name: str) -> str:
    field = Config.model_fields[name]
    text = field.description or name.replace("_", " ")
    allowed = typing.get_args(field.annotation) \
        if typing.get_origin(field.annotation) is Literal else ()
    if name in REGISTRIES:
        allowed = registry_names(name, load=False)
        if name in IMPORTABLE:
            allowed = (*allowed, f"package.module:{IMPORTABLE[name]}")
    if allowed:
        text += f": {' | '.join(map(str, allowed))}"
    if field.default not in (None, ""):
        text += f" (default {field.default})"
    return text.replace("%", "%%")


class LazyHelp:
    """A flag's help, made only when help is printed: the registries it lists import torch,
    which `tinyfed --help` and a mistyped flag should not wait for (argparse asks a help
    string only for truth, `strip()` and `%`)."""

    def __init__(self, name: str):
        self.name = name

    def __bool__(self) -> bool:
        return True

    def strip(self) -> str:
        return self.name

    def __mod__(self, params: dict) -> str:
        return flag_help(self.name) % params


def add_config_flag(group, name: str) -> None:
    """`--name` (and `--no-name` for a boolean) for one config key."""
    flag = "--" + name.replace("_", "-")
    typ = flag_type(Config.model_fields[name].annotation)
    if typ is BOOLEAN:
        group.add_argument(flag, dest=name, action="store_const", const=True, default=None,
                           help=LazyHelp(name))
        group.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False,
                           default=None, help=f"not {flag}")
    else:
        group.add_argument(flag, dest=name, type=typ, default=None, help=LazyHelp(name),
                           metavar=name.upper())


def add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment (every config key; override --config)")
    group.add_argument("--config", metavar="FILE.toml", help="config file with any config keys")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key (repeatable)")
    for name in Config.model_fields:
        add_config_flag(group, name)
    group.add_argument("--print-config", action="store_true",
                       help="print the effective config as TOML and exit")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """--set values, then explicit flags (only those the user gave)."""
    values = parse_set(args.set)
    for key in Config.model_fields:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return values


def config_from(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides_from(args))
