# Two entry points for a fresh machine (Linux, Python 3.11, no GPU needed):
#   make demo   set up .venv, then run the whole job headless (out/demo.*)
#   make test   set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test addon clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml; bpy==5.0.1 and pyzmq come with [test].
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out out

test: $(STAMP)
	$(PY) -m pytest -q

addon: $(STAMP)
	$(PY) build_addon.py --out dist

clean:
	rm -rf $(VENV) out dist runs
