"""Command-line flags that are config fields: the default and the type come from the dataclass, so a flag can
never drift from the config it fills, and ``build`` turns the parsed flags into that config.

Flag names stay the ones users have in scripts (``--obs`` fills ``obs_mode``, ``--critic-steps`` fills
``AgentConfig.critic_pretrain_steps``); the help text says what the flag means and its default is appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from csil.config import from_dict

_NOTHING = object()


def field(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, name: str, *flags: str, help: str,
          default=_NOTHING, **kwargs) -> argparse.Action:
    """``--flag`` (default ``--<name with dashes>``) for field ``name`` of dataclass ``cls``. The argparse
    destination is ``<cls name>.<name>`` so ``build`` can route it; ``default`` overrides the field's own (e.g.
    None for "the preset's")."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = spec.default if default is _NOTHING else default
    hint = typing.get_type_hints(cls)[name]
    kind = next((t for t in (bool, int, float, str) if hint is t or t in typing.get_args(hint)), None)
    if kind is bool:
        kwargs.setdefault("action", argparse.BooleanOptionalAction)
    elif "action" not in kwargs and "type" not in kwargs and kind is not None:
        kwargs["type"] = kind
    flags = flags or (f"--{name.replace('_', '-')}",)
    if kind is not bool and "choices" not in kwargs:
        kwargs.setdefault("metavar", flags[0].lstrip("-").replace("-", "_").upper())
    shown = "" if value is None or "%(default)" in help else " (default %(default)s)"
    return parser.add_argument(*flags, dest=f"{cls.__name__}.{name}", default=value, help=help + shown, **kwargs)


def values(args: argparse.Namespace, cls, skip_none: bool = False) -> dict:
    """The parsed fields of ``cls`` (those with a flag), by field name; ``skip_none`` drops unset ones."""
    prefix = f"{cls.__name__}."
    found = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return {k: v for k, v in found.items() if not (skip_none and v is None)}


def build(cls, args: argparse.Namespace, **extra):
    """``cls`` from its parsed fields, plus ``extra`` fields computed by the command."""
    return cls(**{**values(args, cls), **extra})


def resumed(cls, args: argparse.Namespace, prog: str, *changeable: str):
    """``--resume``: the saved ``config.json`` of the run in ``--logdir`` (a ``cls``), with ``resume`` set and the
    ``changeable`` fields the command line gave (flags whose default is None)."""
    run = values(args, cls)
    if not run["logdir"]:
        raise SystemExit(f"{prog}: --resume needs --logdir (the run directory to continue)")
    saved = Path(run["logdir"]) / "config.json"
    if not saved.exists():
        raise SystemExit(f"{prog}: --resume: {saved} does not exist")
    changes = {name: run[name] for name in changeable if run[name] is not None}
    return dataclasses.replace(from_dict(cls, json.loads(saved.read_text())), resume=True, logdir=run["logdir"],
                               **changes)


def at_least(minimum: int, kind=int):
    """An argparse type: a number ``>= minimum`` (a clear error before anything starts, not a hang later)."""

    def parse(text: str):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid <type> value" message
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def base_policy_target(text: str) -> str:
    """An argparse type: ``local``, ``ws://host:port``, ``wss://host:port`` or ``grpc://host:port``."""
    if text == "local" or (text.startswith(("ws://", "wss://", "grpc://")) and text.split("://", 1)[1]):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a base-policy server: use local, ws://HOST:PORT or "
                                     "grpc://HOST:PORT")
