"""The API reference pages, generated from the package at every docs build (``docs/conf.py``): one
page per module of swap, its ``__all__`` documented from the docstrings, and an index listing the
package's public names (``swap.__all__``) with the module that defines each."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import swap


# a package's re-export that has the name of one of its modules: documented on the module's page
EXCLUDE = {"swap.models": "   :exclude-members: resnet50\n"}


def modules() -> list[str]:
    """Every module of the package but the package itself, sorted."""
    return sorted(m.name for m in pkgutil.walk_packages(swap.__path__, "swap."))


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:     # unchanged: no rebuild of the page
        path.write_text(text)


def write_api(folder: Path) -> None:
    """Write ``folder/index.md`` and one ``folder/MODULE.md`` per module."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name in swap.__all__:
        obj = getattr(swap, name)
        role = "class" if isinstance(obj, type) else "func"
        names.append(f"| `swap.{name}` | {{py:{role}}}`{obj.__module__}.{name}` |")
    index = ["# API reference", "",
             "Every module of the package, documented from its docstrings: shapes, dtypes and units, the errors",
             "raised, and the paper each algorithm comes from. The names `import swap` gives:", "",
             "| name | defined in |", "|---|---|", *names, "",
             "```{toctree}", ":maxdepth: 1", ":caption: Modules", "", *modules(), "```", ""]
    _write(folder / "index.md", "\n".join(index))
    for name in modules():
        importlib.import_module(name)
        options = "   :members:\n   :undoc-members:\n" + EXCLUDE.get(name, "")
        _write(folder / f"{name}.md", f"# {name}\n\n```{{eval-rst}}\n.. automodule:: {name}\n{options}```\n")
