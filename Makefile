# The README's commands. Each target installs what it needs into .venv first.
#   make lab    create the venv, install, open JupyterLab
#   make test   install, then ruff + unit/script tests + every notebook (nbval)
#   make run    execute every lab headless (executed copies under .smml/executed/)
# On a machine whose python already has torch/transformers (a GPU image), skip
# the venv:  make execute PYTHON=python3
PY ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
# Installed before the requirements so that no other package drags in a
# different build: on a CPU-only machine pip finds the CPU wheel; on a GPU box
# it is the CUDA build. Override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
LABS ?= $(sort $(wildcard lab*.ipynb))
NB_TIMEOUT ?= 3600
# make test spreads the test files and notebooks over this many pytest-xdist workers (a file stays on one
# worker: a notebook's cells share its kernel). Most of a test's time is torchrun ranks starting up and
# gloo waiting on loopback, so two workers keep a 2-core box busy; TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup lab run execute test lint reference clean
setup: $(STAMP)

# The requirements go in through uv, itself pip-installed into the venv: it fetches, unpacks and byte-compiles
# the ~150 packages in parallel (26 s against pip's 125 s on the 2-core CI box; the same versions). Where uv
# cannot be had or its install fails (an index only pip is configured for, an unusual platform), pip does it.
UV_INSTALL = $(VENV)/bin/python -m uv pip install -q --native-tls --compile-bytecode --python $(VENV)/bin/python
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	@echo "installing requirements-dev.txt into $(VENV)"
	@{ $(VENV)/bin/python -m pip install -q uv && $(UV_INSTALL) -r requirements-dev.txt; } \
	  || { echo "uv could not install them: installing with pip (slower)"; \
	       $(VENV)/bin/python -m pip install -q -r requirements-dev.txt; }
	@touch $@

# JupyterLab refuses to run as root unless told; containers and cloud GPU boxes often are root.
lab: setup
	$(VENV)/bin/jupyter lab $$( [ "$$(id -u)" = 0 ] && echo --allow-root ) $(LAB_ARGS)

run: setup execute

execute:
	$(PYTHON) -m labutils.scripts.run_labs --timeout $(NB_TIMEOUT) $(LABS)

lint: setup
	$(VENV)/bin/ruff check labutils tests $(LABS)

# pytest exits 5 when it collects nothing; that is not a failure of the code.
test: setup lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests $(LABS) --nbval-lax --nbval-current-env --durations=15 \
	  -n $(TEST_WORKERS) --dist loadfile; \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# A deliberate reference run on real GPUs: writes into results/<gpu-slug>/.
reference:
	SMML_RESULTS_DIR=$(CURDIR)/results $(MAKE) execute PYTHON=$(PYTHON)

clean:
	rm -rf .smml .pytest_cache
