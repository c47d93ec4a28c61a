# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo evaluate protos bench clean prometheus redis image-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

prometheus:
	bash tools/ensure-prometheus.sh

redis:
	bash tools/ensure-redis.sh

test: $(STAMP) prometheus redis
	$(BIN)/python -m pytest -q

demo: $(STAMP) prometheus redis
	$(BIN)/python -m lab.stack

evaluate: $(STAMP)  # docs/EVALUATION.md's tables, about 2 min (120 s of CPU)
	$(BIN)/python bench/evaluation.py

# Builds every image target of the Dockerfile with buildah and runs each as the manifests do
# (tools/image-test.sh, as root; docs/IMAGES.md). Not part of `make test`: about 10 minutes.
image-test:
	test -x $(BIN)/python || $(MAKE) $(STAMP)  # any .venv will do: it runs the host-side checks
	PYTHON=$(BIN)/python bash tools/image-test.sh

protos: $(STAMP)
	$(BIN)/python tools/genprotos.py

bench: $(STAMP)
	$(BIN)/python bench/scaler_rpc.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
