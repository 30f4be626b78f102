# The two commands of a fresh machine: `make demo` and `make test`.
PY      ?= .venv/bin/python
VENV_OK := .venv/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
# With the default PY the targets first build .venv; with PY=<another interpreter> they use it as is.
VENV    := $(if $(filter .venv/bin/python,$(PY)),venv)

.PHONY: demo test test-fast lint venv data clean

$(VENV_OK): requirements.txt requirements-dev.txt
	@test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	rm -f .venv/.installed-*
	touch $@

venv: $(VENV_OK)

data: $(VENV)
	$(PY) preprocess_data.py --cfg cfg/preprocess/shapes.yml

demo: $(VENV)
	$(PY) demo.py

lint: $(VENV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(VENV) lint
	$(PY) -m pytest -q tests

# Everything but the end-to-end script runs (tests marked pytest.mark.slow).
test-fast: $(VENV)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf output
