# Two commands on a fresh machine: `make run` and `make test`. Everything else is installed here.
# `make run` installs what the service and `gradserve train` need (.[server]); `make test` adds what
# tests and benchmarks need (.[dev]: torch, pytest, ...). Each install leaves a stamp in the venv,
# remade when pyproject.toml changes; a dev install satisfies the server stamp too.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SERVER_STAMP := $(VENV)/.installed-server
DEV_STAMP    := $(VENV)/.installed-dev
APT_PKGS := prometheus docker-compose chromium
JOB     ?= examples/digits_mlp.yaml
PYTEST_ARGS ?=
# `make console`: Prometheus on CONSOLE_LISTEN scraping `gradserve serve`'s exporter at METRICS,
# keeping its data and config in CONSOLE_DIR.
METRICS ?= 127.0.0.1:9090
CONSOLE_LISTEN ?= 127.0.0.1:9091
CONSOLE_DIR ?= runs/console
# Where Prometheus installs keep their own console libraries (prom.lib, menu.lib): the upstream
# tarball and image, and Debian's package. gradserve.lib builds on them.
PROM_CONSOLE_LIBRARIES ?= $(firstword $(wildcard \
    /usr/share/prometheus/console_libraries/prom.lib \
    /etc/prometheus/console_libraries/prom.lib \
    /usr/share/doc/prometheus/examples/console_libraries/prom.lib))

.PHONY: run test venv system-deps proto bench console clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(SERVER_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[server]'
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(SERVER_STAMP)

venv: $(DEV_STAMP)

# Prometheus (server + promtool) and docker-compose (to validate the compose file) come from Debian.
system-deps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v promtool   >/dev/null || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(APT_PKGS); \
	fi

run: $(SERVER_STAMP)
	$(BIN)/gradserve train $(JOB)

test: $(DEV_STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerate the Python stubs from protos/ (they are committed so the client installs without grpcio-tools).
proto: $(DEV_STAMP)
	$(BIN)/python -m gradserve_services.protogen

bench: $(DEV_STAMP)
	$(BIN)/gradserve bench engine --json
	$(BIN)/gradserve bench transport --json
	$(BIN)/gradserve bench training --json

# The console (deploy/prometheus/consoles/gradserve.html) without Docker: its libraries folder holds
# Prometheus's own libraries and gradserve.lib side by side, as docker-compose.yml mounts them.
console: system-deps
	@test -n "$(PROM_CONSOLE_LIBRARIES)" || { echo "no prom.lib found: set PROM_CONSOLE_LIBRARIES=DIR/prom.lib" >&2; exit 2; }
	mkdir -p $(CONSOLE_DIR)/console_libraries
	cp $(dir $(PROM_CONSOLE_LIBRARIES))*.lib deploy/prometheus/console_libraries/gradserve.lib $(CONSOLE_DIR)/console_libraries/
	printf 'global: {scrape_interval: 5s}\nscrape_configs:\n  - job_name: gradserve\n    static_configs: [{targets: ["%s"]}]\n' '$(METRICS)' > $(CONSOLE_DIR)/prometheus.yml
	@echo "console: http://$(CONSOLE_LISTEN)/consoles/gradserve.html (scraping $(METRICS))"
	exec prometheus --config.file=$(CONSOLE_DIR)/prometheus.yml --storage.tsdb.path=$(CONSOLE_DIR)/data \
	    --web.listen-address=$(CONSOLE_LISTEN) --web.console.templates=deploy/prometheus/consoles \
	    --web.console.libraries=$(CONSOLE_DIR)/console_libraries

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
