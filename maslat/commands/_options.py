"""Command-line options generated from a configuration dataclass: one option per field, with the field's name
(``--total-steps``), type, default and docstring, so the algorithm's ``Args`` is the single source of all three.

A field's help is its attribute docstring (the string literal after it, CleanRL's ``Args`` style) or its entry
in the class docstring's ``Attributes:`` section (Google style). Types: ``int``, ``float``, ``str``, ``bool``
(``--x/--no-x``), ``Literal[...]`` (choices), ``X | None``, ``tuple[X, ...]`` (one or more values). Options
default to "not given", so the dataclass's own default applies and is shown in the help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["add_dataclass_options", "dataclass_kwargs", "field_docs"]


def field_docs(cls: type) -> dict[str, str]:
    """Per field, its help text: the attribute docstring, else its ``Attributes:`` entry, else ``""``."""
    docs = _attributes_section(inspect.getdoc(cls) or "")
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _attributes_section(doc: str) -> dict[str, str]:
    """``name: text`` entries (continuation lines indented deeper; ``a, b: text`` names several) of the
    ``Attributes:`` section of a Google-style docstring."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:" or ln.endswith("Attributes:"))
    except StopIteration:
        return out
    names: list[str] = []
    indent = None
    for ln in lines[start + 1:]:
        if not ln.strip():
            continue
        ind = len(ln) - len(ln.lstrip())
        m = re.match(r"\s*([A-Za-z_][\w, ]*):\s*(.*)", ln)
        if m and (indent is None or ind == indent) and not ln.lstrip().startswith("("):
            indent = ind
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif indent is not None and ind > indent and names:
            for n in names:
                out[n] = f"{out[n]} {ln.strip()}"
        elif indent is not None and ind <= indent:
            names = []  # a note at the section's indent that is not an entry ends the previous entry
    return out


def _parse_type(tp: Any) -> tuple[Any, str | int | None, tuple | None]:
    """``(element type, nargs, choices)`` of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parse_type(args[0]) if len(args) == 1 else (str, None, None)
    if origin is typing.Literal:
        vals = typing.get_args(tp)
        return type(vals[0]), None, tuple(vals)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        elem, _, choices = _parse_type(args[0]) if args else (str, None, None)
        n = "+" if Ellipsis in typing.get_args(tp) or origin is list else len(args)
        return elem, n, choices
    return tp, None, None


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:
        d = f.default_factory()
    else:
        return "required"
    if d is None:
        return "none"
    if isinstance(d, (tuple, list)):
        return " ".join(map(str, d))
    return f"{d:,}" if isinstance(d, int) and not isinstance(d, bool) and abs(d) >= 10_000 else str(d)


def add_dataclass_options(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                          exclude: Iterable[str] = (), choices: Mapping[str, tuple] | None = None,
                          aliases: Mapping[str, tuple[str, ...]] | None = None,
                          help_extra: Mapping[str, str] | None = None, option_prefix: str = "",
                          convert: Mapping[str, Callable[[str], Any]] | None = None) -> None:
    """One ``--field-name`` option per field of ``cls`` (``dest`` = ``prefix + field``; absent unless given).

    ``option_prefix`` names them ``--<option_prefix>field-name`` (two dataclasses with a common field in one
    command); ``convert`` maps a field to the function that reads its text (before ``choices`` are checked).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        elem, nargs, lit = _parse_type(hints[f.name])
        opts = ["--" + option_prefix + f.name.replace("_", "-"), *((aliases or {}).get(f.name, ()))]
        text = " ".join(t for t in (docs.get(f.name, ""), (help_extra or {}).get(f.name, "")) if t)
        help_ = f"{text} (default: {_default_text(f)})".strip().replace("%", "%%")
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": help_}
        if elem is bool:
            parser.add_argument(*opts, action=argparse.BooleanOptionalAction, **kw)
            continue
        cs = lit or (choices or {}).get(f.name)
        if cs is not None:
            kw["choices"] = cs
        if nargs is not None:
            kw["nargs"] = nargs
        kw["type"] = (convert or {}).get(f.name) or (elem if elem in (int, float, str) else str)
        kw["metavar"] = None if cs is not None else f.name.upper()
        parser.add_argument(*opts, **kw)


def dataclass_kwargs(ns: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (lists as tuples), for ``cls(**kwargs)``."""
    out = {}
    for f in dataclasses.fields(cls):
        if hasattr(ns, prefix + f.name):
            v = getattr(ns, prefix + f.name)
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out
