# The two set-up commands of the README. Both work from a fresh clone on a machine that has
# torch, torchvision and detectron2 installed (see README: Install).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: demo test install install-test check-prereqs

check-prereqs:
	@$(PYTHON) -c "import torch, torchvision, detectron2" 2>/dev/null || { \
	  echo "torch, torchvision and detectron2 must be installed first: see README.md, 'Install'."; exit 1; }

install: check-prereqs
	@$(PYTHON) -c "import d2kd, cv2, matplotlib" 2>/dev/null || \
	  $(PIP) install --no-build-isolation -e .

install-test: install
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PIP) install "pytest>=7"

# Trains a small BCCD teacher (reused when present), distils a student from it, evaluates
# both and prints their AP side by side.
demo: install
	$(PYTHON) tools/demo.py

test: install-test
	$(PYTHON) -m pytest -q tests
