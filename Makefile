# The set-up and test commands of the README. They work from a fresh clone on a machine that has
# torch, torchvision and detectron2 installed (see README: Install).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: demo test test-fast install install-test check-prereqs

check-prereqs:
	@$(PYTHON) -c "import torch, torchvision, detectron2" 2>/dev/null || { \
	  echo "torch, torchvision and detectron2 must be installed first: see README.md, 'Install'."; exit 1; }

install: check-prereqs
	@$(PYTHON) -c "import d2kd, cv2, matplotlib" 2>/dev/null || \
	  $(PIP) install --no-build-isolation -e .

# d2kd (editable) with its `test` extra: pip installs the pytest range of setup.cfg, and replaces
# an installed pytest outside it.
install-test: check-prereqs
	$(PIP) install --no-build-isolation -e ".[test]"

# Trains a small BCCD teacher (reused when present), distils a student from it, evaluates
# both and prints their AP side by side.
demo: install
	$(PYTHON) tools/demo.py

# Every test (CI: .ci/run).
test: install-test
	$(PYTHON) -m pytest -q tests

# The tests that do not train a detector (tests/conftest.py: the `train` marker), on one worker
# per core, a test file per worker (JOBS=0: all in this process).
JOBS ?= auto
test-fast: install-test
	$(PYTHON) -m pytest -q -n $(JOBS) --dist loadfile -m "not train" tests
