# The README's two commands are `make demo` and `make test`; `.ci/run` runs `make test`.
.PHONY: setup demo test bench clean

setup:
	scripts/setup.sh

demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} .venv/bin/atm demo $(if $(PROFILE),--profile $(PROFILE))

test:
	scripts/setup.sh --tests
	.venv/bin/ruff check src tests benchmarks scripts
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 \
	  .venv/bin/python -m pytest -q tests

bench: setup
	OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py

clean:
	rm -rf runs datasets/build .pytest_cache
