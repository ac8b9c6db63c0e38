# The same commands for people and CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Node.js client: `npm ci` from its lock file, then its build (dist/).
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

# checkov pins packaging<24 and brings ~90 packages: a virtualenv of its own (constraints-checkov.txt)
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: install node run test test-all test-unit test-deploy fuzz fuzz-fields fuzz-sessions faults check lint typecheck proto proto-check buf bench services clean

install: $(STAMP) $(NODE_STAMP) $(CHECKOV_STAMP)

# The client distribution (clients/python) in the same command as the server, which depends on
# it: pip then takes iam-grpc-client from the repository and never looks for it on PyPI.
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e clients/python -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	cd $(NODE_DIR) && npm run --silent build
	touch $(NODE_STAMP)

# Rebuild the Node.js client's dist/ after editing its sources.
node: $(NODE_STAMP)
	cd $(NODE_DIR) && npm run --silent build

$(CHECKOV_STAMP): constraints-checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -c constraints-checkov.txt checkov
	touch $(CHECKOV_STAMP)

run: $(STAMP)
	$(BIN)/iam-grpc serve

# The suite in two passes: everything but the `serial` tests on TEST_WORKERS processes
# (pytest-xdist, one test file per worker at a time), then the serial ones alone (they
# measure time or start servers of their own; tests/conftest.py lists them).
# The fault suite and the deployment material have targets of their own (.ci/run calls them).
TEST_WORKERS ?= 2
SUITE := tests/unit tests/integration tests/e2e
# A test that hangs fails after TEST_TIMEOUT seconds with its stack (pytest-timeout).
TEST_TIMEOUT ?= 300
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --timeout $(TEST_TIMEOUT) -m "not serial" $(SUITE)
	$(BIN)/python -m pytest --timeout $(TEST_TIMEOUT) -m serial $(SUITE)

# Everything CI runs: the suite, the fault suite, the deployment material.
test-all: test faults test-deploy

test-unit: install
	$(BIN)/python -m pytest tests/unit

# Kubernetes manifests (rendered, schema-validated, scanned by checkov, started for real),
# the Dockerfile (hadolint), the Istio recipe and the Grafana dashboard.
test-deploy: install
	$(BIN)/python -m pytest tests/deploy

# Longer runs of the property tests (`make test` runs them bounded).
fuzz: fuzz-fields fuzz-sessions

# Field limits generated from the schema against MariaDB: FUZZ_FIELDS_EXAMPLES per field.
fuzz-fields: install
	FUZZ_FIELDS_EXAMPLES=$${FUZZ_FIELDS_EXAMPLES:-500} $(BIN)/python -m pytest -p no:randomly -q \
		tests/integration/test_field_properties.py

# The fault suite (two replicas under load, each dependency failed in turn), with its report.
faults: install
	$(BIN)/python -m pytest tests/faults -s -p no:randomly

# The session state machine, long and random (make test runs it short and derandomised).
FUZZ_EXAMPLES ?= 300
FUZZ_STEPS ?= 60
fuzz-sessions: install
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

# Python (clients/python/iam_grpc_client/_proto, re-exported as iam_grpc.proto) and TypeScript
# (clients/node/src/gen) from protos/.
proto: install
	$(BIN)/python scripts/gen_proto.py

proto-check: install
	$(BIN)/python scripts/gen_proto.py --check

bench: install
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/ratelimit.py
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/login.py

services:
	scripts/services.sh

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .mypy_cache .pytest_cache .ruff_cache
	rm -rf $(NODE_DIR)/node_modules $(NODE_DIR)/dist $(NODE_DIR)/build
