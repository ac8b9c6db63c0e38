# The same commands for people and CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit fuzz check lint typecheck proto proto-check buf bench services clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/iam-grpc serve

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

# The session state machine, long and random (make test runs it short and derandomised).
FUZZ_EXAMPLES ?= 300
FUZZ_STEPS ?= 60
fuzz: install
	IAM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) IAM_FUZZ_STEPS=$(FUZZ_STEPS) \
		$(BIN)/python -m pytest tests/integration/test_session_machine.py -p no:randomly -x

check: install lint typecheck buf proto-check

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

buf:
	cd protos && ../$(BIN)/buf lint

proto: install
	$(BIN)/python scripts/gen_proto.py

proto-check:
	$(BIN)/python scripts/gen_proto.py --check

bench: install
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/ratelimit.py
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/login.py

services:
	scripts/services.sh

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
