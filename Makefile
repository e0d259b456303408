# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup system-deps demo test bench clean

setup: system-deps $(VENV)/.installed

# Orthanc and DCMTK are real PACS servers the tests run against; docker-compose validates
# docker/docker-compose.yml (no Docker engine needed). Debian packages.
system-deps:
	@if ! command -v Orthanc >/dev/null || ! command -v dcmqrscp >/dev/null || ! command -v storescp >/dev/null || ! command -v docker-compose >/dev/null; then \
	    echo "installing Debian packages orthanc, dcmtk and docker-compose"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends orthanc dcmtk docker-compose >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/dqr-xnat demo

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
