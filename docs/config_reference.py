"""The configuration reference page, generated from the config dataclasses of :mod:`swap.config`:
every key by the dotted name ``--set`` takes, its type, its default and its meaning (the comment
written beside the field). Run at every docs build (``docs/conf.py``) and by the tests."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import yaml

from swap.config import Config

FIELD = re.compile(r"^    (\w+): [^=]+?(?: = .*?)?(?:\s+#\s?(.*))?$")
MORE = re.compile(r"^\s{8,}#\s?(.*)$")           # a comment continued under the one beside a field


def field_comments(cls) -> dict[str, str]:
    """{field name: the comment beside it, continuation lines joined} of a config dataclass (and
    the classes it extends)."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        current = None
        for line in inspect.getsource(klass).splitlines():
            match = FIELD.match(line)
            if match:
                current = match.group(1)
                found[current] = (match.group(2) or "").strip()
            elif current and MORE.match(line):
                found[current] = f"{found[current]} {MORE.match(line).group(1).strip()}".strip()
            else:
                current = None
    return found


def _default(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip() or "''"


def rows(obj=None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every key of ``obj`` (default: a fresh :class:`Config`)."""
    obj = obj if obj is not None else Config()
    comments = field_comments(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += rows(value, f"{key}.")
        else:
            out.append((key, str(f.type), _default(value), comments.get(f.name, "")))
    return out


def sections() -> list[tuple[str, str, list]]:
    """(section key, the section's docstring, its rows) in the order of :class:`Config`."""
    cfg = Config()
    top = [r for r in rows(cfg) if "." not in r[0]]
    out = [("(top level)", inspect.getdoc(Config) or "", top)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.append((f.name, inspect.getdoc(type(value)) or "", rows(value, f"{f.name}.")))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_reference(path: Path) -> None:
    """Write the Markdown page to ``path`` (its folder is created)."""
    lines = ["# Configuration reference", "",
             "Every key of a run's config, by the dotted name that `--set KEY=VALUE`, a YAML preset and the",
             "library's dict of overrides take (`--set phase1.batch_size=4096`). Generated from",
             "`swap/config.py` when these pages are built. Units: batch sizes in samples, epochs in passes",
             "over the training set, learning rates per update, accuracies in percent.", ""]
    for name, doc, section in sections():
        lines += [f"## {name}", "", doc.replace("\n", " "), "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        lines += [f"| `{k}` | `{_cell(t)}` | `{_cell(d)}` | {_cell(m)} |" for k, t, d, m in section]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if not path.is_file() or path.read_text() != text:     # unchanged: no rebuild of the page
        path.write_text(text)
