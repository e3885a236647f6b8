# One entry point per chore; CI calls `make test` too.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/transmural/v1/*.proto)
STUBS  := transmural/v1/.generated
DATA   ?=
NODES  ?= 3

.PHONY: setup stubs test bench demo devnet lint clean

setup: $(STAMP) $(STUBS)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Generated gRPC stubs: built from proto/, never edited, never committed.
$(STUBS): $(STAMP) $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $@

stubs: $(STUBS)

test: setup
	$(BIN)/python -m pytest -q

# Measured figures beside same-run baselines; writes BENCHMARKS.md (< 10 minutes).
bench: setup
	$(BIN)/python -m tools.bench.run

demo: setup
	$(BIN)/transmural-admin devnet --nodes $(NODES) --demo $(if $(DATA),--data "$(DATA)")

devnet: setup
	$(BIN)/transmural-admin devnet --nodes $(NODES) $(if $(DATA),--data "$(DATA)")

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(STUBS) transmural/v1/*_pb2*.py transmural/v1/*_pb2*.pyi
