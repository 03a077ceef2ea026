# Two commands set everything up: `make run` serves, `make test` tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ADDR ?= 127.0.0.1:8080
# Local development only: a well-known key that must never sign a real token.
DEV_SECRET := local-development-secret--DO-NOT-USE-IN-PRODUCTION
DEV_SCOPES := container:read container:run container:delete

.PHONY: run test fuzz bench soak mutation clean

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

run: $(BIN)/.installed
	@echo "Serving on http://$(ADDR) (static backend, LOCAL DEVELOPMENT SECRET)."
	@echo "In another shell:"
	@echo "  export BUS_CONTAINERS_JWT_SECRET='$(DEV_SECRET)'"
	@echo "  TOKEN=\$$($(BIN)/bus-api-provider-containers token --subject demo-account --scope '$(DEV_SCOPES)')"
	@echo "  curl -sS -H \"Authorization: Bearer \$$TOKEN\" http://$(ADDR)/api/v1/containers/status"
	BUS_CONTAINERS_JWT_SECRET='$(DEV_SECRET)' $(BIN)/bus-api-provider-containers --backend static --addr $(ADDR)

test: $(BIN)/.installed
	sh tools/ensure-tools.sh nginx redis-server promtool
	$(BIN)/python -m pytest

# Long fuzzing: the fuzz tests with FUZZ_SCALE times their examples and a fresh seed
# (printed, so a failure can be rerun with FUZZ_SEED=... and --hypothesis-seed=...).
FUZZ_SCALE ?= 40
FUZZ_SEED ?= $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fuzz: $(BIN)/.installed
	@echo "fuzz: FUZZ_SCALE=$(FUZZ_SCALE) FUZZ_SEED=$(FUZZ_SEED)"
	FUZZ_SCALE=$(FUZZ_SCALE) FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest -p no:cacheprovider \
		--hypothesis-seed=$(FUZZ_SEED) tests/test_fuzz.py tests/test_reply_fuzz.py \
		tests/security/test_openapi_rules.py tests/security/test_schemathesis_all.py tests/test_openapi.py

# py-spy (the profile benchmark) is for benchmarks only: the product and its tests never need it.
bench: $(BIN)/.installed
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk)
	test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet -c constraints.txt py-spy
	$(BIN)/python -m benchmarks

# A bounded chaos run (SOAK_SECONDS, default 120, then a bounded drain): foreground and detached clients
# under Events API, Redis (append-only) and provider restarts and SIGKILLs; exits non-zero when a run was
# executed twice, lost, not billed exactly once, or answered outside the contract. Logs: SOAK_LOG_DIR.
soak: $(BIN)/.installed
	sh tools/ensure-tools.sh redis-server
	$(BIN)/python tools/soak.py

# Mutation testing ([mutmut] in setup.cfg: the fast in-process tests), module by module,
# on at most 2 processes and bounded by MUTATION_TIME seconds; not part of `make test`.
# Other modules: make mutation MUTATE="controls state". RESUME=1 runs only the mutants of MUTATE
# not killed yet (left unrun by a time bound, survived, without tests), keeping the other results.
MUTATE ?= auth billing usage errors backends bus.replies
MUTATION_TIME ?= 2400
MUTATION_CHILDREN ?= 2
MUTANTS = $(if $(RESUME),$(shell test -d mutants && $(BIN)/python tools/mutation_report.py --not-run $(MUTATE)),\
	$(foreach m,$(MUTATE),"bus_containers_provider.$(m).*"))
$(BIN)/.mutation-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,mutation]"
	touch $@

mutation: $(BIN)/.mutation-installed
	$(if $(strip $(MUTANTS)),timeout $(MUTATION_TIME) $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) \
		$(MUTANTS) > mutants.log 2>&1 || test $$? -eq 124,@echo "mutation: nothing left to run")
	$(BIN)/python tools/mutation_report.py $(MUTATE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mutants mutants.log
