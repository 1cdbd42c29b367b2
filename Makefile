.PHONY: setup demo test bench soak lint clean

setup:
	bash scripts/setup.sh

## Start PostgreSQL+pgstac (:55432, $PG_PORT), sample SPOT-like data, a COG range server
## (:8081, $COG_PORT) and the tiler on :8000 ($PORT); a taken port is named before anything starts
demo: setup
	.venv/bin/tiler demo

## Run the whole test suite (real PostgreSQL, real HTTP range server)
test:
	bash scripts/setup.sh test
	.venv/bin/python -m pytest -q -p no:cacheprovider

## Several minutes of mixed and hostile load against `tiler serve`, RSS per worker ($SOAK_ARGS)
soak: setup
	.venv/bin/python benchmarks/soak.py $(SOAK_ARGS)
## Benchmark against stock titiler-pgstac (same data, same run); BENCH_ARGS="--quick" for a short run
bench: setup
	bash benchmarks/setup.sh
	.venv/bin/python benchmarks/run.py $(BENCH_ARGS)

lint: setup
	.venv/bin/python -m pip install -q ruff
	.venv/bin/ruff check tiler

clean:
	rm -rf .demo .bench .pytest_cache
