# The two commands a new user needs (see README): `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast docs fuzz install data clean

$(BIN)/swap: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -e '.[test,docs,hf,tensorboard,mlflow,lightning,ray]'    # every extra: the tests cover each
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true    # .pyc on every core (pip: one core, +20 s)
	@touch $@

install: $(BIN)/swap

# Fashion-MNIST: Debian's package when we are root on Debian/Ubuntu, else `swap data fetch`; and the
# text corpus of the char-level LM (Debian's fortunes).
data: install
	@$(BIN)/swap data find fashion-mnist >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	    else $(BIN)/swap data fetch fashion-mnist; fi; }
	@$(BIN)/swap data find text-char >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get install -y -qq fortunes || (apt-get update -qq && apt-get install -y -qq fortunes)); \
	    else echo "text-char needs Debian's fortunes package (apt-get install fortunes); its tests will fail"; fi; }

demo: data
	$(BIN)/swap train --config fashion_mnist_quick --workers 2 --out $(DEMO_OUT) --overwrite

# bandit (PyCQA's security linter) over the package first: a finding is fixed, or marked inline
# (`# nosec BXXX`) under a comment that gives the reason
test: data docs
	$(BIN)/bandit -q -r swap
	$(BIN)/python -m compileall -q swap examples tests >/dev/null    # .pyc once: each test's processes import them
	$(BIN)/python -m pytest -q --durations=15 tests

# The unit tests without the end-to-end runs (tests marked e2e in tests/conftest.py): the development loop
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" --durations=10 tests

# The docs site (Sphinx, docs/): warnings are errors, cross-references checked (nitpicky)
docs: install
	$(BIN)/sphinx-build -q -W -n --keep-going -b html docs docs/_build/html

# Broad random search of the property tests (not part of `make test` / CI, whose examples are fixed).
fuzz: data
	$(BIN)/python -m pytest -q --durations=15 tests/test_fuzz.py --hypothesis-profile fuzz

clean:
	rm -rf $(VENV) runs *.egg-info
