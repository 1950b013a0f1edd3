# make test: create .venv when missing (torch 2.14.1 + torchvision 0.29.1 + compressai 1.2.8 and the rest of the
# full set), then run the test suite. Re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test lint bench clean-venv proto demo chromium

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip >/dev/null
	$(VENV)/bin/pip install -e '.[full,dev]'
	touch $(STAMP)

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

# The dashboard test renders the monitor's page in a real headless browser: Debian's chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_models.py

clean-venv:
	rm -rf $(VENV)

proto: $(STAMP)
	$(VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/splitinfer.proto

demo: $(STAMP)
	$(VENV)/bin/splitinfer demo
