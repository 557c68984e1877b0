# `make demo` and `make test` set everything up on a fresh machine, with the versions in requirements.lock.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# pip quietly, without its version nag; the lock pins everything the suite runs with (torch: the CPU wheel).
PIP := $(BIN)/pip --disable-pip-version-check -q -q
EXTRAS := export,plot,dev,flower

.PHONY: demo test bench lint lock wheel clean fuzz gpu-check

$(STAMP): pyproject.toml $(LOCK)
	@echo "planwire: setting up $(VENV) with the versions in $(LOCK) (torch CPU, onnxruntime, pyzmq, ...)." >&2
	@echo "planwire: about two minutes on a fresh machine; later runs skip this." >&2
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(PIP) install -c $(LOCK) pip setuptools
	@# torch first, pinned: an unpinned torch pulls several GB of CUDA packages.
	@$(PIP) install -c $(LOCK) torch
	@$(PIP) install -c $(LOCK) --no-build-isolation -e '.[$(EXTRAS)]'
	@touch $(STAMP)
	@echo "planwire: $(VENV) ready." >&2

# The Node.js worker's packages (worker/node), reinstalled when package-lock.json changes. Without npm this
# says so and the Node worker's tests skip. ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's install script
# would fetch CUDA libraries from outside the npm registry; the CPU library ships inside the package.
NODE_STAMP := worker/node/node_modules/.planwire-installed
$(NODE_STAMP): worker/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix worker/node --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "planwire: no npm here: the Node.js worker's tests skip (install Node 20+ to run them)" >&2; fi

demo: $(STAMP) $(NODE_STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest -q

# `make bench RUNS=3`: three full runs, each kept in bench/runs/, aggregated into bench/results.json.
RUNS ?= 1
bench: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m bench --runs $(RUNS)

# On a machine with an NVIDIA GPU: planwire[cuda] in a fresh venv, the GPU tests and the gpu bench family,
# results in OUT (the script's header says more; not part of make test: CI has no GPU).
OUT ?= gpu-results
gpu-check:
	bash bench/gpu_machine.sh $(OUT) $(GPU_FLAGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Refresh requirements.lock: newest versions that pyproject.toml's ranges allow, in a scratch venv, then the
# whole suite runs on them via `make test`. Commit the lock with the change that needed it.
lock:
	rm -rf .lockvenv
	$(PY) -m venv .lockvenv
	.lockvenv/bin/pip --disable-pip-version-check -q -q install --upgrade pip setuptools
	.lockvenv/bin/pip --disable-pip-version-check -q -q install torch==2.13.0
	.lockvenv/bin/pip --disable-pip-version-check -q -q install '.[$(EXTRAS)]'
	{ echo "# Exact versions \`make test\`, \`make demo\` and CI install (pip constraints). Refresh: \`make lock\`."; \
	  echo "# Users installing planwire as a library get pyproject.toml's ranges instead."; \
	  .lockvenv/bin/pip freeze --all --exclude planwire | sed -e 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' | sort -f; } > $(LOCK)
	rm -rf .lockvenv
	rm -f $(STAMP)
	@echo "wrote $(LOCK); now run make test"

# Fuzz the worker's request decoder and plan checker with hypothesis for MINUTES minutes (tests/fuzzing.py).
MINUTES ?= 5
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzzing --minutes $(MINUTES)

# A wheel for a worker-only install elsewhere: pip install dist/planwire-*.whl
wheel: $(STAMP)
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) *.egg-info build dist
