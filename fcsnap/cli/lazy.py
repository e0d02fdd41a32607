"""The root command group, which builds a command only when it is used.

typer builds a command by reading its function's signature and making every option: for all
commands, a good part of what starting `fcsnap restore` costs. Here the root knows only which
module holds each command; `fcsnap restore` imports and builds restore alone. `fcsnap --help`,
completion and "did you mean" still see every command (the help lists them, building each).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, MutableMapping
from typing import Any

from typer.core import TyperCommand, TyperGroup
from typer.main import get_command_from_info, get_group_from_info
from typer.models import CommandInfo

# command -> the module of fcsnap.cli that defines it, in the order the help lists them
WHERE = {
    "init": "names", "inspect": "builds", "pack": "builds", "diff": "builds", "import": "builds",
    "export": "builds", "squash": "builds", "unpack": "builds", "verify": "builds",
    "restore": "serving", "serve": "serving",
    "ps": "daemon", "stop": "daemon", "checkpoint": "daemon", "ls": "names", "tag": "names",
    "rm": "names",
    "gc": "names",
    "push": "names", "pull": "names", "demo": "tools", "ws": "tools",
}


def _info(name: str) -> Any:
    """The typer CommandInfo (or TyperInfo of a group) `name`'s module registered."""
    app = importlib.import_module(f"fcsnap.cli.{WHERE[name]}").app
    return next(i for i in [*app.registered_commands, *app.registered_groups] if i.name == name)


def summary(name: str) -> Any:
    """A command with `name`'s help and no options: what the root's help lists, without
    building every command's options."""
    info = _info(name)
    if not isinstance(info, CommandInfo):  # a group (ws)
        text = info.help or info.typer_instance.info.help or ""
        return TyperGroup(name=name, help=inspect.cleandoc(text), rich_markup_mode="rich")
    text = info.help or inspect.getdoc(info.callback) or ""
    return TyperCommand(name, help=inspect.cleandoc(text), rich_markup_mode="rich")


def build(name: str) -> Any:
    """The click command (or group) `name`, made from its module's typer app."""
    app = importlib.import_module(f"fcsnap.cli.{WHERE[name]}").app
    for info in app.registered_commands:
        if info.name == name:
            return get_command_from_info(info, pretty_exceptions_short=True,
                                         rich_markup_mode="rich")
    group = next(g for g in app.registered_groups if g.name == name)
    return get_group_from_info(group, pretty_exceptions_short=True, suggest_commands=True,
                               rich_markup_mode="rich")


class Commands(MutableMapping[str, Any]):
    """Every command's name; a command built the first time it is looked up."""

    def __init__(self) -> None:
        self.built: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in WHERE:
            raise KeyError(name)
        if name not in self.built:
            self.built[name] = build(name)
        return self.built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self.built[name] = command

    def __delitem__(self, name: str) -> None:
        raise TypeError("fcsnap's commands are fixed")

    def __iter__(self) -> Iterator[str]:
        return iter(WHERE)

    def __len__(self) -> int:
        return len(WHERE)

    def __contains__(self, name: object) -> bool:
        return name in WHERE


class LazyGroup(TyperGroup):
    """fcsnap's root: its commands a Commands mapping; its help lists summaries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = Commands()  # type: ignore[assignment]
        self.listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        """The names alone (typer's own reads the mapping's items, building every command)."""
        return list(WHERE)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if self.listing and cmd_name in WHERE:
            return summary(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False
