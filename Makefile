# The two commands of a fresh machine: `make demo` and `make test`.
PY      ?= .venv/bin/python
VENV_OK := .venv/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)

.PHONY: demo test venv data clean

$(VENV_OK): requirements.txt requirements-dev.txt
	@test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	rm -f .venv/.installed-*
	touch $@

venv: $(VENV_OK)

data: venv
	$(PY) preprocess_data.py --cfg cfg/preprocess/shapes.yml

demo: venv
	$(PY) demo.py

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf output
