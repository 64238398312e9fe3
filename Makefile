# dicom-node: `make demo` runs the node on its embedded defaults, `make test` runs the tests.
# Both install what they need: Debian packages (as root) and a local virtual environment.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb dicom3tools postgresql chromium chromium-driver
STAMP := $(VENV)/.installed
# Two pytest-xdist workers, one test module each at a time: much of the suite waits on
# nodes, Orthanc and DCMTK processes, so two share 2 cores well (19 -> 9.5 min here).
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

.PHONY: demo demo-ui test deps venv lint typecheck bench-ingest clean

demo: deps $(STAMP)
	$(VENV)/bin/python scripts/demo.py

demo-ui: deps $(STAMP)
	$(VENV)/bin/python scripts/demo_ui.py

test: deps $(STAMP)
	$(BIN)/pytest -m "not gpu" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	{ command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc; } || missing="$$missing orthanc"; \
	test -e $(ORTHANC_DICOMWEB) || missing="$$missing orthanc-dicomweb"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v stdbuf >/dev/null || missing="$$missing coreutils"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or: sudo apt-get install$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check dicom_node processors db tests bench
	$(BIN)/ruff format --check dicom_node processors db tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench-ingest: deps $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
