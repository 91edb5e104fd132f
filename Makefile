# Two entry points for a fresh machine (Linux, Python 3.11, no GPU needed):
#   make demo   set up .venv, then run the whole job headless (out/demo.*)
#   make test   set up .venv (and .venv-bpy42 for the Blender 4.2 LTS install check), then run the tests
#               (two pytest-xdist workers of one thread each, a test file a worker: tests/conftest.py)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Blender 4.2 LTS as a Python module: the built extension must install and run there too.
# About 22 s and 335 MB of download, 1 GB on disk (measured 2026-11-22).
VENV42  := .venv-bpy42
STAMP42 := $(VENV42)/.installed
BPY42   := bpy==4.2.23

.PHONY: setup demo test addon clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build this machine has (pyproject.toml asks only torch>=2.4:
	# a GPU box installs its own CUDA build); bpy==5.0.1 and pyzmq come with [test].
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(STAMP42):
	$(PYTHON) -m venv $(VENV42)
	$(VENV42)/bin/python -m pip install --quiet $(BPY42)
	touch $(STAMP42)

demo: $(STAMP)
	$(PY) scripts/demo.py --out out

test: $(STAMP) $(STAMP42)
	FIT_IMPLICIT_BPY42=$(CURDIR)/$(VENV42)/bin/python $(PY) -m pytest -q --durations=30 -n 2 --dist loadfile --no-loadscope-reorder

addon: $(STAMP)
	$(PY) build_addon.py --out dist

clean:
	rm -rf $(VENV) $(VENV42) out dist runs
