# Two commands on a fresh machine: `make run` and `make test`. Everything else is installed here.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-dev
APT_PKGS := prometheus docker-compose
JOB     ?= examples/digits_mlp.yaml
PYTEST_ARGS ?=

.PHONY: run test venv system-deps proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

# Prometheus (server + promtool) and docker-compose (to validate the compose file) come from Debian.
system-deps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v promtool   >/dev/null || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(APT_PKGS); \
	fi

run: $(STAMP)
	$(BIN)/gradserve train $(JOB)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerate the Python stubs from protos/ (they are committed so the client installs without grpcio-tools).
proto: $(STAMP)
	$(BIN)/python -m gradserve_services.protogen

bench: $(STAMP)
	$(BIN)/gradserve bench engine --json
	$(BIN)/gradserve bench transport --json
	$(BIN)/gradserve bench training --json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
