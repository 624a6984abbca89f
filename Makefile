# prefpipe: `make demo` runs the whole loop on a tiny model it trains itself; `make test` runs the tests.
# Every target depends on `install`, so on a fresh machine either command does all the set-up.
#
# The stage targets chain by their output folders (a stamp `.complete` is written when a stage has
# finished), so `make train` after `make label` redoes nothing; each stage also resumes by itself.
# The variables turn the same targets into the real recipe (README), e.g.
#   make eval MODEL=stabilityai/stable-diffusion-xl-base-1.0 PROMPTS=prompts.txt EVAL_PROMPTS=held_out.txt \
#        SCORER=pickscore WORKDIR=work/sdxl GEN_ARGS="--size 1024 --steps 30 --dtype fp16" ...

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
PREFPIPE := $(BIN)/prefpipe

WORKDIR      ?= work/demo
DEMO_MODEL   := $(WORKDIR)/models/base
MODEL        ?= $(DEMO_MODEL)
PROMPTS      ?= $(WORKDIR)/prompts/train.txt
EVAL_PROMPTS ?= $(WORKDIR)/prompts/held_out.txt
SCORER       ?= compressibility
CONTROL      ?= incompressibility
EVAL_SCORERS ?= $(SCORER)
PER_PROMPT   ?= 6
EVAL_PER_PROMPT ?= 16
GEN_ARGS     ?= --steps 20 --guidance 2 --batch-size 64 --scheduler ddim --no-progress
LABEL_ARGS   ?= --strategy random-k --k 3 --no-progress
TRAIN_ARGS   ?= --beta 500 --learning-rate 1e-3 --lora-rank 8 --lora-targets attn,ff,conv --batch-size 32 \
                --max-steps 200 --checkpoint-every 0 --no-progress
EVAL_ARGS    ?= --steps 20 --guidance 2 --batch-size 64 --scheduler ddim --no-progress
DEMO_ARGS    ?=
HEADLINE_ARGS ?= --check

CANDIDATES := $(WORKDIR)/candidates
LABELED    := $(WORKDIR)/label-$(SCORER)
RUN        := $(WORKDIR)/runs/dpo-$(SCORER)
EVALDIR    := $(WORKDIR)/eval-$(SCORER)
# the demo's base model is built here; a hub id or another folder is used as it is
MODEL_DEP  := $(if $(filter $(DEMO_MODEL),$(MODEL)),$(DEMO_MODEL)/model_index.json,)
PROMPTS_DEP := $(filter $(WORKDIR)/prompts/%,$(PROMPTS))
EVAL_PROMPTS_DEP := $(filter $(WORKDIR)/prompts/%,$(EVAL_PROMPTS))

.PHONY: install test lint bench demo demo-model generate label train eval d3po d3po-eval d3po-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# HPSv2's reference package, for the parity test only: the `hpsv2` wheel is broken offline and pins
	# pytest 7.2 / protobuf 3.20, so install the fork that ships its BPE file, without its pins.
	$(PY) -m pip install -q --no-deps hpsv2x==1.2.0 clint==0.5.1
	@touch $@

test: install lint
	$(BIN)/pytest -q

# ruff, and the layer rule of docs/architecture.md (import-linter contracts in pyproject.toml)
lint: install
	$(BIN)/ruff check prefpipe labelers trainer tests benchmarks
	$(BIN)/lint-imports

bench: install
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/label.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/d3po.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/host_memory.py

# ---- the demo: base model -> generate -> label -> train -> eval, and the control with the opposite reward
# After the shared candidates, the two arms (SCORER and CONTROL: label, train, eval) run side by side, each
# on DEMO_THREADS threads: the tiny model's tensors gain little from a second thread, two arms gain 1.7x.
# Both arms are scored with both rewards, so the headline reads the control on the reward's scale;
# `--check` makes `make demo` fail unless both 95% intervals sit on their side of 50%.
DEMO_THREADS ?= 1

demo: install
	$(MAKE) --no-print-directory generate
	$(MAKE) --no-print-directory -j2 demo-arm-$(SCORER) demo-arm-$(CONTROL)
	$(PREFPIPE) demo-headline --workdir $(WORKDIR) --scorer $(SCORER) --control $(CONTROL) $(HEADLINE_ARGS)

demo-arm-%: $(CANDIDATES)/.complete
	OMP_NUM_THREADS=$(DEMO_THREADS) $(MAKE) --no-print-directory eval SCORER=$* EVAL_SCORERS="$* $(filter-out $*,$(SCORER) $(CONTROL))"

demo-model: $(DEMO_MODEL)/model_index.json

$(DEMO_MODEL)/model_index.json: | $(STAMP)
	$(PREFPIPE) demo-model --out $(DEMO_MODEL) $(DEMO_ARGS)

$(WORKDIR)/prompts/train.txt $(WORKDIR)/prompts/held_out.txt &: | $(STAMP)
	$(PY) -c "from prefpipe.demo.world import write_demo_prompts; write_demo_prompts('$(WORKDIR)/prompts')"

generate: $(CANDIDATES)/.complete
label: $(LABELED)/pairs/ai/.complete
train: $(RUN)/.complete
eval: $(EVALDIR)/report.json

$(CANDIDATES)/.complete: $(MODEL_DEP) $(PROMPTS_DEP) | $(STAMP)
	$(PREFPIPE) generate --model $(MODEL) --prompts $(PROMPTS) --per-prompt $(PER_PROMPT) --out $(CANDIDATES) $(GEN_ARGS)
	@touch $@

$(LABELED)/pairs/ai/.complete: $(CANDIDATES)/.complete
	$(PREFPIPE) label --scorer $(SCORER) --candidates $(CANDIDATES) --out $(LABELED) $(LABEL_ARGS)
	@touch $@

$(RUN)/.complete: $(LABELED)/pairs/ai/.complete
	$(PREFPIPE) train --model $(MODEL) --pairs $(LABELED)/pairs/ai --workdir $(WORKDIR) --out $(RUN) --resume latest $(TRAIN_ARGS)
	@touch $@

$(EVALDIR)/report.json: $(RUN)/.complete $(EVAL_PROMPTS_DEP)
	$(PREFPIPE) eval --base $(MODEL) --tuned $(RUN) --prompts $(EVAL_PROMPTS) $(addprefix --scorer ,$(EVAL_SCORERS)) \
	    --per-prompt $(EVAL_PER_PROMPT) --holdout $(LABELED)/pairs/ai --out $(EVALDIR) $(EVAL_ARGS)

# ---- D3PO's online loop: ROUNDS of generate --trajectories -> label -> train --objective d3po, each
# round sampling with the last round's LoRA (D3PO_DIR/round-k/{candidates,scores,pairs/ai,run}).
# `make d3po-demo` runs it for SCORER and for CONTROL side by side and evaluates every round against the
# base on the held-out prompts (D3PO_DIR/eval), then prints the same headline as `make demo`.
D3PO_DIR  = $(WORKDIR)/d3po-$(SCORER)
ROUNDS    ?= 3
D3PO_ARGS ?= --per-prompt 4 --steps 20 --guidance 2 --batch-size 64 --no-progress --train max-steps=40 \
             --train batch-size=8 --train learning-rate=3e-3 --train step-fraction=0.5
ROUND_RUNS = $(foreach k,$(shell seq 1 $(ROUNDS)),round-$(k)=$(D3PO_DIR)/round-$(k)/run)

d3po: $(MODEL_DEP) $(PROMPTS_DEP) | $(STAMP)
	$(PREFPIPE) d3po-rounds --model $(MODEL) --prompts $(PROMPTS) --workdir $(D3PO_DIR) \
	    --rounds $(ROUNDS) --scorer $(SCORER) $(D3PO_ARGS)

d3po-eval: d3po $(EVAL_PROMPTS_DEP)
	$(PREFPIPE) eval --base $(MODEL) $(addprefix --tuned ,$(ROUND_RUNS)) --prompts $(EVAL_PROMPTS) \
	    $(addprefix --scorer ,$(EVAL_SCORERS)) --per-prompt $(EVAL_PER_PROMPT) \
	    --holdout $(D3PO_DIR)/round-1/pairs/ai --out $(D3PO_DIR)/eval $(EVAL_ARGS)

d3po-demo: install
	$(MAKE) --no-print-directory $(MODEL_DEP) $(PROMPTS_DEP) $(EVAL_PROMPTS_DEP)
	$(MAKE) --no-print-directory -j2 d3po-arm-$(SCORER) d3po-arm-$(CONTROL)
	$(PREFPIPE) demo-headline --workdir $(WORKDIR) --scorer $(SCORER) --control $(CONTROL) \
	    --reports 'd3po-{run}/eval' --tuned round-$(ROUNDS) --method D3PO $(HEADLINE_ARGS)

d3po-arm-%:
	OMP_NUM_THREADS=$(DEMO_THREADS) $(MAKE) --no-print-directory d3po-eval SCORER=$* \
	    EVAL_SCORERS="$* $(filter-out $*,$(SCORER) $(CONTROL))"

clean:
	rm -rf work .pytest_cache test-artifacts
