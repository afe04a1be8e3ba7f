"""Config: presets, overrides, and the impossible settings refused before any work."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from swap.config import SwapError, check_world, load_config, parse_overrides


def test_preset_and_overrides():
    cfg = load_config("fashion_mnist_quick", ["phase1.batch_size=4096", "seed=3", "phase2.peak_lr=0.1",
                                              "data.dir=/tmp/x", "phase1.warmup_epochs=2"])
    assert cfg.name == "fashion_mnist_quick"
    assert (cfg.phase1.batch_size, cfg.seed, cfg.phase2.peak_lr, cfg.data.dir) == (4096, 3, 0.1, "/tmp/x")
    assert isinstance(cfg.phase1.warmup_epochs, float)
    sci = load_config("fashion_mnist_quick", ["phase2.peak_lr=1e-2", "phase1.batch_size=4e3"])
    assert sci.phase2.peak_lr == 0.01 and sci.phase1.batch_size == 4000


def test_paper_presets_hold_the_published_settings():
    c10 = load_config("cifar10_paper")
    assert (c10.phase1.batch_size, c10.phase1.peak_lr, c10.phase1.warmup_epochs, c10.phase1.stop_acc) == (4096, 1.2, 30, 98.0)
    assert (c10.phase2.batch_size, c10.phase2.peak_lr, c10.phase2.epochs) == (512, 0.12, 30)
    c100 = load_config("cifar100_paper")
    assert (c100.phase1.batch_size, c100.phase1.peak_lr, c100.phase1.warmup_epochs, c100.phase1.stop_acc) == (2048, 1.2, 45, 90.0)
    assert (c100.phase2.batch_size, c100.phase2.peak_lr) == (128, 0.05)
    for c in (c10, c100):
        assert (c.optim.momentum, c.optim.nesterov, c.optim.weight_decay, c.model.name) == (0.9, True, 5e-4, "resnet9")


def test_hash_changes_with_any_knob():
    assert load_config("fashion_mnist_quick").hash() == load_config("fashion_mnist_quick").hash()
    assert load_config("fashion_mnist_quick").hash() != load_config("fashion_mnist_quick", ["seed=1"]).hash()


@pytest.mark.parametrize("override, message", [
    ("phase1.stop_acc=0", "stop_acc must be in \\(0, 100\\]"),
    ("phase1.stop_acc=100.5", "stop_acc"),
    ("phase1.peak_lr=-0.1", "phase1.peak_lr must be > 0"),
    ("phase2.epochs=0", "phase2.epochs must be >= 1"),
    ("sgd.batch_size=0", "sgd.batch_size"),
    ("phase1.warmup_epochs=99", "warmup_epochs must be in"),
    ("phase1.bogus=1", "unknown config key 'phase1.bogus'"),
    ("phase1.batch_size=big", "expects int"),
    ("model.name=vgg", "model.name"),
    ("workers=0", "workers must be >= 1"),
    ("phase1.peak_lr=inf", "finite"),
    ("phase2.peak_lr=.nan", "finite"),
])
def test_impossible_configs_are_refused(override, message):
    with pytest.raises(SwapError, match=message):
        load_config("fashion_mnist_quick", [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(SwapError, match="fashion_mnist_quick"):
        load_config("no_such_preset")


def test_batch_must_split_over_ranks():
    cfg = load_config("fashion_mnist_quick")
    check_world(cfg, 2, 4096, "phase1")
    with pytest.raises(SwapError, match="not divisible by the number of processes \\(3\\)"):
        check_world(cfg, 3, 4096, "phase1")


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}
    with pytest.raises(SwapError, match="KEY=VALUE"):
        parse_overrides(["nokey"])


def _swap_imports(nested: bool) -> dict[str, set[str]]:
    """{module: swap modules it imports} for every module of the package: its top-level import
    statements, and with ``nested`` also those inside functions."""
    root = Path(__file__).resolve().parent.parent / "swap"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if nested else tree.body
        out = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                for alias in node.names:                  # `from . import distributed` names a module
                    sub = f"{target}.{alias.name}"
                    out.add(sub if (root.parent / (sub.replace(".", "/") + ".py")).is_file() else target)
        graph[name] = out
    return graph


def test_config_and_schedules_do_not_import_each_other_and_no_imports_form_a_cycle():
    """No import circle among swap's modules, counting the imports inside functions too."""
    nested = _swap_imports(nested=True)
    assert "swap.config" not in nested["swap.schedules"] and "swap.config" not in nested["swap.errors"]
    assert nested["swap.errors"] == set()
    top = nested
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:        # depth-first search for a back edge
        state[module] = 1
        for dep in top.get(module, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [module, dep])}"
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2
    for module in top:
        if module not in state:
            visit(module, [])


def test_every_module_says_what_it_exports():
    """``__all__`` in every module of swap, naming only what the module has; the package's public
    API (``swap.__all__``) importable from ``swap`` itself."""
    import importlib
    import pkgutil

    import swap
    names = ["swap"] + [m.name for m in pkgutil.walk_packages(swap.__path__, "swap.")]
    for name in names:
        if name in ("swap.lightning", "swap.ray_pool"):     # optional extras: read, not imported
            tree = ast.parse(Path(swap.__path__[0], name.split(".")[1] + ".py").read_text())
            assert any(isinstance(n, ast.Assign) and n.targets[0].id == "__all__" for n in tree.body
                       if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)), f"{name} has no __all__"
            continue
        module = importlib.import_module(name)
        assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it does not have: {missing}"
    assert all(hasattr(swap, n) for n in swap.__all__)


def test_each_section_checks_itself_and_legal_values_have_one_owner():
    """A section's rules run on the section alone (a config section built in code is checked before
    it joins a config); the legal values config checks are the ones their owners use."""
    from swap.config import (DATASETS, EXTRAP_VARIANTS, TRAINING_SECTIONS, Config, Phase2Config, SGDConfig,
                             check_section)
    from swap.data.sources import SOURCES
    from swap.models import MODELS
    from swap.optim.extrap import VARIANTS
    from swap.schedules import SHAPES, warmup_decay

    assert set(DATASETS) == set(SOURCES) and EXTRAP_VARIANTS is VARIANTS
    assert {"resnet9", "smallcnn", "char-transformer", "resnet50"} == set(MODELS)
    for shape in SHAPES:                                  # every shape config admits, the schedule draws
        assert warmup_decay(peak_lr=1.0, total_steps=10, warmup_steps=2, shape=shape)(10) == 0.0
    with pytest.raises(SwapError, match="unknown schedule shape 'step'"):
        warmup_decay(peak_lr=1.0, total_steps=10, warmup_steps=2, shape="step")
    with pytest.raises(SwapError, match="phase2.layout must be processes, sequential or vmap, got 'grid'"):
        check_section(Phase2Config(layout="grid"), "phase2")
    with pytest.raises(SwapError, match="sgd_large.schedule must be linear or cosine, got 'step'"):
        check_section(SGDConfig(schedule="step"), "sgd_large")
    cfg = Config()
    assert set(TRAINING_SECTIONS) == {"phase1", "phase2"} | {name for name, value in vars(cfg).items()
                                                             if isinstance(value, SGDConfig)}


def test_keys_added_later_keep_the_hash_of_a_config_that_leaves_them_at_their_defaults():
    """A run written before the averages along the trajectory existed resumes: at their defaults the
    new keys are not hashed; set, they are."""
    import hashlib
    import json
    from swap.config import HASHED_WHEN_SET, NOT_HASHED
    cfg = load_config("fashion_mnist_compare")
    d = cfg.to_dict()
    for key in (*HASHED_WHEN_SET, *NOT_HASHED):
        section, _, name = key.partition(".")
        (d.pop(section) if not name else d[section].pop(name))
    d = {k: v for k, v in d.items() if v != {}}
    assert cfg.hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert len({cfg.hash(), *(load_config("fashion_mnist_compare", [kv]).hash()
                              for kv in ("ema.decay=0.9", "lawa.k=2", "sgd_large.average=ema", "sgd.updates=7",
                                         "phase2.average_along=lawa"))}) == 6
