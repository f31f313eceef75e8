# The two commands of the README: `make run` and `make test`. Both do the set-up first (idempotent).
PYTHON ?= python3

.PHONY: setup run test bench clean

# The daemon stops on ^C (SIGINT) or SIGTERM, answering what is in flight.

setup:
	@scripts/setup.sh

run: setup
	$(PYTHON) -m walredod doctor --pings 200
	$(PYTHON) -m walredod serve

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) bench/engine_latency.py
	$(PYTHON) bench/daemon_study.py

clean:
	$(MAKE) -s -C pgext clean
	rm -rf walredod/_native build *.egg-info
