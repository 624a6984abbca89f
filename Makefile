# prefpipe: `make demo` runs the whole loop on an embedded tiny model; `make test` runs the test suite.
# Every target depends on `install`, so on a fresh machine either command does all the set-up.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

# Stage targets: override these for the real recipe (see README), e.g.
#   make generate MODEL=stabilityai/stable-diffusion-xl-base-1.0 PROMPTS=prompts.txt WORKDIR=work/sdxl
MODEL     ?= $(WORKDIR)/models/base
PROMPTS   ?= ../shared/data/PartiPrompts.tsv
WORKDIR   ?= work/demo
PER_PROMPT ?= 4
GEN_ARGS  ?=

.PHONY: install test lint bench generate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# HPSv2's reference package, for the parity test only: the `hpsv2` wheel is broken offline and pins
	# pytest 7.2 / protobuf 3.20, so install the fork that ships its BPE file, without its pins.
	$(PY) -m pip install -q --no-deps hpsv2x==1.2.0 clint==0.5.1
	@touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check prefpipe labelers trainer tests benchmarks

bench: install
	$(PY) benchmarks/generate.py

generate: install
	$(BIN)/prefpipe generate --model $(MODEL) --prompts $(PROMPTS) --per-prompt $(PER_PROMPT) --out $(WORKDIR)/candidates $(GEN_ARGS)

clean:
	rm -rf work .pytest_cache
