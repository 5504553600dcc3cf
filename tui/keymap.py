"""The user's own keys: a ``[keys]`` table in hopscope's config file.

Keys are remapped by binding id, as Textual's keymaps do; every binding of the UI has
one (see :data:`~hopscope.tui.commands.COMMANDS`), and the config file maps ids to
keys::

    [keys]
    quit = "ctrl+q"
    search = "s,ctrl+f"       # several keys: commas, or a list ["s", "ctrl+f"]

The file is ``$HOPSCOPE_CONFIG``, else ``$XDG_CONFIG_HOME/hopscope/config.toml``, else
``~/.config/hopscope/config.toml``.  It is checked whole before any screen opens, so a
typo is one line naming the file and the entry rather than a key that silently does
nothing: unknown ids, unknown key names and two actions on one key are errors.
"""

from __future__ import annotations

import os
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from textual.binding import Binding, BindingsMap, BindingType
from textual.keys import (
    KEY_NAME_REPLACEMENTS,
    REPLACED_KEYS,
    Keys,
    _character_to_key,
    _normalize_key_list,
)

from .commands import COMMANDS
from .help import HelpScreen
from .replay_view import ComparisonScreen, EditScreen, TargetScreen
from .save import SaveScreen

__all__ = [
    "ENV",
    "ConfigError",
    "binding_ids",
    "config_path",
    "dialog_bindings",
    "dialog_keymap",
    "in_order",
    "load_keymap",
    "parse_keymap",
    "remap",
]

#: The environment variable naming the config file.
ENV = "HOPSCOPE_CONFIG"

_MODIFIERS = {"ctrl", "shift", "alt", "meta", "super", "hyper"}
_NAMED = {key.value.rpartition("+")[2] for key in Keys} | set(KEY_NAME_REPLACEMENTS.values())
_DIALOGS = (HelpScreen, TargetScreen, EditScreen, ComparisonScreen, SaveScreen)


class ConfigError(Exception):
    """The config file cannot be used; the message is one line naming what is wrong."""


def config_path(environ: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """The config file, and whether the user named it (then it must exist)."""
    env = os.environ if environ is None else environ
    named = env.get(ENV)
    if named:
        return Path(named).expanduser(), True
    base = env.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path("~/.config").expanduser()
    return root / "hopscope" / "config.toml", False


def dialog_bindings() -> list[Binding]:
    """The keys of the dialogs (help, replay, save), one binding per id."""
    seen: dict[str, Binding] = {}
    for screen in _DIALOGS:
        for item in screen.BINDINGS:
            if isinstance(item, Binding) and item.id:
                seen.setdefault(item.id, item)
    return list(seen.values())


def binding_ids() -> dict[str, str]:
    """Every binding id the keymap may name, with its default keys."""
    ids = {command.id: command.keys for command in COMMANDS if command.keys}
    for binding in dialog_bindings():
        ids.setdefault(binding.id or "", binding.key)
    return ids


def _check_key(key: str) -> str | None:
    """Why ``key`` is not a key Textual can report, or None when it is one."""
    if not key:
        return "an empty key"
    if len(key) == 1:
        return None if key.isprintable() else f"unknown key {key!r}"
    if key.endswith("++"):  # "ctrl++": the plus key with a modifier
        head, name = key[:-2], "+"
    else:
        head, _, name = key.rpartition("+")
    unknown = [m for m in head.split("+") if head and m not in _MODIFIERS]
    if unknown:
        return f"unknown modifier {unknown[0]!r} in {key!r}"
    if len(name) == 1 and name.isprintable():
        return None
    if name in _NAMED or name in REPLACED_KEYS:
        return None
    try:
        unicodedata.lookup(name.upper().replace("_", " "))
    except KeyError:
        return f"unknown key {key!r}"
    return None


def _normalise(key: str) -> str:
    return _character_to_key(key) if len(key) == 1 else key


def parse_keymap(data: Mapping[str, object], where: str) -> dict[str, str]:
    """Check a parsed config file; ``where`` names it in errors."""
    unknown = sorted(set(data) - {"keys"})
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (only a [keys] table)")
    table = data.get("keys", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'keys' must be a table: [keys]")
    known = binding_ids()
    keymap: dict[str, str] = {}
    for binding_id, value in table.items():
        if binding_id not in known:
            raise ConfigError(
                f"{where}: [keys] {binding_id}: no such binding id (press ? in the UI for the ids)"
            )
        if isinstance(value, str):
            keys = value.split(",")
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            keys = list(value)
        else:
            raise ConfigError(f'{where}: [keys] {binding_id}: give keys as "a,b" or ["a", "b"]')
        keys = [key.strip() for key in keys]
        if not keys:
            raise ConfigError(f"{where}: [keys] {binding_id}: no keys given")
        for key in keys:
            problem = _check_key(key)
            if problem is not None:
                raise ConfigError(f"{where}: [keys] {binding_id}: {problem}")
        keymap[binding_id] = ",".join(keys)
    _check_clashes(keymap, where)
    return keymap


def _check_clashes(keymap: Mapping[str, str], where: str) -> None:
    """Two actions on one key of the main screen: Textual would keep only one."""
    owner: dict[str, str] = {}
    for command in COMMANDS:
        keys = keymap.get(command.id, command.keys)
        for key in (k.strip() for k in keys.split(",") if k.strip()):
            name = _normalise(key)
            other = owner.setdefault(name, command.id)
            if other != command.id:
                raise ConfigError(
                    f"{where}: [keys] key {key!r} is bound to both {other} and {command.id}"
                )


def load_keymap(path: str | Path | None = None) -> dict[str, str]:
    """The keymap in ``path`` (default :func:`config_path`); no file there is no keymap,
    unless the user named that file."""
    explicit = path is not None
    if path is None:
        path, explicit = config_path()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist (${ENV})") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_keymap(data, str(path))


def remap(items: Iterable[BindingType], keymap: Mapping[str, str]) -> list[Binding]:
    """``items`` with the keys the user gave their ids (as Textual applies a keymap)."""
    out = []
    for item in items:
        binding = item if isinstance(item, Binding) else Binding(*item)
        keys = keymap.get(binding.id) if binding.id else None
        if keys:
            binding = binding.with_key(keys, key_display=None)
        out.append(binding)
    return out


def in_order(bindings: BindingsMap, keymap: Mapping[str, str]) -> BindingsMap:
    """``bindings`` with the user's keys, each remapped binding where it was.

    Textual's own keymap (:meth:`BindingsMap.apply_keymap`, run on every look at the
    bindings) moves a remapped binding to the end of the map, and the footer shows the
    bindings in map order: a remapped action would jump to the end of the footer.  So
    the app and the request list get their keys here, once, and Textual's keymap keeps
    only the ids of the dialogs (:func:`dialog_keymap`).  As with Textual's keymap, a
    key the user gave to a remapped binding is taken from any other binding of the map.
    """
    keys = {bid: _normalize_key_list(value) for bid, value in keymap.items()}
    remapped = {binding.id for _, binding in bindings if binding.id and binding.id in keys}
    taken = {key for bid in remapped if bid for key in keys[bid].split(",")}
    out: list[Binding] = []
    for key, binding in bindings:
        if binding.id in remapped:
            remapped.discard(binding.id)  # its first key: where all its keys go
            out.append(binding.with_key(keys[binding.id or ""], key_display=None))
        elif binding.id not in keys and key not in taken:
            out.append(binding)
    return BindingsMap(out)


def dialog_keymap(keymap: Mapping[str, str]) -> dict[str, str]:
    """The part of ``keymap`` left to Textual: the dialogs' ids, not those of
    :data:`~hopscope.tui.commands.COMMANDS` (:func:`in_order` applied those)."""
    commands = {command.id for command in COMMANDS}
    return {bid: keys for bid, keys in keymap.items() if bid not in commands}
