"""Sphinx configuration of swap's documentation: Markdown pages (myst-parser), the furo theme, the
API reference from the docstrings (autodoc + napoleon) and the configuration reference generated
from the config dataclasses at every build (so it cannot drift from the code). Build: ``make docs``."""
from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS))

from api_reference import write_api  # noqa: E402
from config_reference import write_reference  # noqa: E402

project = "swap"
author = "the swap developers"
copyright = "2026, the swap developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "swap"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True                 # a dataclass's "Attributes:" as fields, not a second description
# Names the docstrings point at that live outside this site (torch, the standard library, extras):
# without the network there are no intersphinx inventories, so they are not cross-referenced.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|np|numpy|lightning|transformers|mlflow|ray|tqdm|yaml|safetensors|argparse|"
               r"collections|typing|pathlib|dataclasses|contextlib|multiprocessing|pickle|json|os|socket|"
               r"datetime|enum|abc|builtins|io|types|functools|threading|subprocess|signal|_pickle)(\..*)?"),
    (r"py:.*", r"(Path|Callable|Iterable|Iterator|Mapping|Sequence|Any|Tensor|Module|Optimizer|Dataset|"
               r"DataLoader|Sampler|Generator|dtype|device|Dist|ProcessGroup|Schedule|Segment|Parts|Task|"
               r"Config|DataConfig|OptimConfig|RunDir|Context|LoopState|Throughput|Measure|Hardware|"
               r"Interrupted|SwapError|Unit|Saving|Start|Position|Evaluation|Guard|UpdateStep|SGDStep|"
               r"ImageDataset|Loader|Augment|Callback|Method|RunSpec|DirMode|WorkerResult|BatchSizeRule|"
               r"Tracking|LayerwiseOptimizer|ExtrapSGD|AveragedModel|ModelOutput|Phase2Config|TrainingSection|"
               r"Phase1Config|StopConfig)"),
    (r"py:.*", r"(optional|callable|default|int|float|str|bool|dict|list|tuple|None|object|type|bytes)"),
]


def _reference(app) -> None:
    write_reference(DOCS / "reference" / "config.md")
    write_api(DOCS / "reference" / "api")


def _public_alias(app, env, node, contnode):
    """``swap.NAME`` for a name of ``swap.__all__`` resolves to where it is defined (``swap.api.train_swap``)."""
    import swap

    target = node.get("reftarget", "")
    head, _, name = target.rpartition(".")
    if node.get("refdomain") != "py" or head != "swap" or name not in swap.__all__:
        return None
    node["reftarget"] = f"{getattr(swap, name).__module__}.{name}"
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], node, contnode)


def setup(app) -> None:
    app.connect("builder-inited", _reference)
    app.connect("missing-reference", _public_alias)
