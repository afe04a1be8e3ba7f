"""Every Python example of the README and of the docs' pages runs as a plain script (`python
example.py`), shortened by the documented SWAP_SET overrides; a library call without the `__main__`
guard is refused at once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# each example once: the README's quick start is also the library page's first example
EXAMPLES = list(dict.fromkeys(block for page in PAGES
                              for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)))
SHORT = ("workers=2;phase1.max_epochs=2;phase1.warmup_epochs=1;phase2.epochs=1;"
         "data.train_subset=4096;data.test_subset=500")
# The Hugging Face examples compare the run's test loss with their own pass over the whole test set
# (no test_subset), and train on fewer samples (a BERT step costs what 20 small-CNN steps do), in one
# process (each process imports transformers).
HF_SHORT = ("workers=2;phase1.max_epochs=1;phase1.warmup_epochs=1;phase2.epochs=1;phase2.layout=sequential;"
            "data.train_subset=1024")


# The Lightning example (examples/lightning_fashion.py) is shortened by its own constants line.
LIGHTNING_FULL = "EPOCHS, SWITCH_EPOCH, TRAIN_SUBSET = 8, 5, 8192"
LIGHTNING_SHORT = "EPOCHS, SWITCH_EPOCH, TRAIN_SUBSET = 3, 2, 4096"


def _run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "example.py"
    if "swap.lightning" in source:
        assert LIGHTNING_FULL in source
        source = source.replace(LIGHTNING_FULL, LIGHTNING_SHORT)
    script.write_text(source)
    env = {**os.environ, "SWAP_SET": HF_SHORT if "transformers" in source else SHORT, "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "stubs"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_readme_has_python_examples():
    assert len(EXAMPLES) >= 1 and all("import swap" in e for e in EXAMPLES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_as_a_script(tmp_path, real_fashion, index):
    done = _run_script(tmp_path, EXAMPLES[index])
    assert done.returncode == 0, done.stderr[-3000:]
    result = eval(done.stdout.strip().splitlines()[-1])
    if "from_pretrained" in EXAMPLES[index]:                          # a Hugging Face model, saved and reloaded
        swap_loss = result["swap"]["loss"]
        assert abs(result["from_pretrained"] - swap_loss) < 1e-5 * swap_loss, result   # the same model, its own loss
        if "GPT2" in EXAMPLES[index]:
            assert swap_loss < 3.5, result           # nats per byte; uniform over 256 bytes is 5.55
        else:
            assert result["swap"]["top1"] > 31.0, result   # 5 categories: naming the largest is right for 26%
    elif "swap.lightning" in EXAMPLES[index]:         # Lightning's own launcher: 2 ranks, 2 + 1 epochs on 2,048 images
        assert "terminate called" not in done.stderr                  # every process exits cleanly
        # too short for the average to beat its workers (tests/test_lightning.py measures that on a
        # longer run); a broken average or BN pass would fall far outside them
        workers = result["workers"]
        assert len(workers) == 2 and min(workers) - 1.0 < result["averaged"] < max(workers) + 1.0, result
        assert result["test_acc"] > 55.0, result                      # chance is 10%
    elif "swap.EMA(" in EXAMPLES[index]:                              # an EMA in the user's own loop
        assert result["samples"] == 50 and result["averaged_loss"] < result["initial_loss"], result
    elif "train_swap" in EXAMPLES[index]:                             # the printed test_acc dict
        assert len(result["workers"]) == 2 and result["averaged"] > 60.0  # 2 + 1 short epochs; chance is 10%
    if "import wandb" in EXAMPLES[index]:                             # what the callback sent (tests/stubs/wandb.py)
        logged = [json.loads(line) for line in (tmp_path / "wandb_log.jsonl").read_text().splitlines()]
        assert logged[-1] == {"summary": {"test_acc": result}}
        curves = [r for r in logged if "summary" not in r]
        assert {"phase1/test_acc", "phase2/worker1/test_acc", "average/test_acc"} <= set().union(*curves)
        assert max(r["critical_path_updates"] for r in curves if "average/test_acc" in r) == \
            max(r["critical_path_updates"] for r in curves)                # the averaged model ends the path
        # each record reached the callback once, from the one process that wrote it (2 ranks in phase 1)
        points = [(tag, r["critical_path_updates"]) for r in curves for tag in r if tag != "critical_path_updates"]
        assert len(points) == len(set(points))


def _unguarded(source: str) -> str:
    """The example with its `if __name__ == "__main__":` block moved to the top level."""
    head, _, body = source.partition('if __name__ == "__main__":')
    assert body, "the example has no __main__ guard"
    body = body.split("\n", 1)[1]
    return head + textwrap.dedent(body)


def test_a_call_without_the_main_guard_is_refused_before_any_work(tmp_path, real_fashion):
    source = next(e for e in EXAMPLES if "train_swap" in e)
    done = _run_script(tmp_path, _unguarded(source))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("swap.errors.SwapError: ") and 'if __name__ == "__main__":' in last
    assert "example.py:" in last
    assert "[phase1]" not in done.stderr and "bootstrapping" not in done.stderr   # refused before phase 1
