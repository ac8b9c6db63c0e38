# The same commands for people and CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit fuzz fuzz-fields check lint typecheck proto proto-check buf bench services clean

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

# Longer runs of the property tests (`make test` runs them bounded).
fuzz: fuzz-fields

# Field limits generated from the schema against MariaDB: FUZZ_FIELDS_EXAMPLES per field.
fuzz-fields: install
	FUZZ_FIELDS_EXAMPLES=$${FUZZ_FIELDS_EXAMPLES:-500} $(BIN)/python -m pytest -p no:randomly -q \
		tests/integration/test_field_properties.py

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
