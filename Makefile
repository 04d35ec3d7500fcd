# The README's commands. Each target creates the virtual environment first when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(PY) -m dbrx_train.demo

# Each script prints a markdown table (see bench/README.md); about 29 minutes on 2 cores.
bench: $(STAMP)
	$(PY) bench/bench_model.py
	$(PY) bench/bench_inference.py
	$(PY) bench/bench_quality.py
	$(PY) bench/bench_trainer.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_curriculum.py
	$(PY) bench/bench_expert_parallel.py
	$(PY) bench/bench_long_context.py
	$(PY) bench/bench_spark_prep.py
	$(PY) bench/bench_init.py
	$(PY) bench/bench_init_memory.py
	$(PY) bench/bench_remote_data.py
	$(PY) bench/bench_qlora_memory.py
	$(PY) bench/bench_optimizer.py

clean:
	rm -rf $(VENV) runs build *.egg-info
