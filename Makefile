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
LABEL_ARGS   ?= --strategy all --no-progress
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

# constraints.txt locks every version (the set the demo's figures were measured with); pyproject.toml
# keeps ranges for library users.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# HPSv2's reference package, for the parity test only: the `hpsv2` wheel is broken offline and pins
	# pytest 7.2 / protobuf 3.20, so install the fork that ships its BPE file, without its pins.
	$(PY) -m pip install -q --no-deps hpsv2x==1.2.0 clint==0.5.1
	# ImageReward's and HPSv3's reference packages, for their parity tests only: image-reward pins timm 0.6 /
	# fairscale (whose sdist builds against the installed torch), hpsv3 pins transformers 4.45; both without pins.
	$(PY) -m pip install -q --no-deps --no-build-isolation image-reward==1.5 fairscale==0.4.13 hpsv3==1.0.0
	@touch $@

# Two pytest workers, one test file each at a time (pytest-xdist): the demo chains train with one thread, so
# on two cores they overlap with the rest; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

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
# Thread counts are fixed, not taken from the machine: a float sum's bits depend on how it is split over
# threads, so the same figures need the same split (the base model pins its own: one thread).
DEMO_THREADS     ?= 1
DEMO_GEN_THREADS ?= 2

demo: install
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(MAKE) --no-print-directory generate
	$(MAKE) --no-print-directory -j2 demo-arm-$(SCORER) demo-arm-$(CONTROL)
	$(PREFPIPE) demo-headline --workdir $(WORKDIR) --scorer $(SCORER) --control $(CONTROL) $(HEADLINE_ARGS)

demo-arm-%: $(CANDIDATES)/.complete
	OMP_NUM_THREADS=$(DEMO_THREADS) $(MAKE) --no-print-directory eval SCORER=$* EVAL_SCORERS="$* $(filter-out $*,$(SCORER) $(CONTROL))"

demo-model: $(DEMO_MODEL)/model_index.json

$(DEMO_MODEL)/model_index.json: | $(STAMP)
	$(PREFPIPE) demo-model --out $(DEMO_MODEL) $(DEMO_ARGS)

# `make demo` once per base-model seed (its own base model, candidates and arms in SEEDS_WORKDIR-K), then
# one table of every seed's result and the spread; fails (as `make demo` does) unless every seed's verdict holds.
SEEDS         ?= 0 1 2
SEEDS_WORKDIR ?= work/demo-seed
.PHONY: demo-seeds

demo-seeds: install
	for k in $(SEEDS); do \
	    $(MAKE) --no-print-directory demo WORKDIR=$(SEEDS_WORKDIR)-$$k DEMO_ARGS="$(DEMO_ARGS) --seed $$k" HEADLINE_ARGS= || exit 1; \
	done  # HEADLINE_ARGS= : a seed whose verdict fails still gets its row; only a failed stage stops the loop
	$(PREFPIPE) demo-headline --workdir '$(SEEDS_WORKDIR)-{seed}' --seeds "$(SEEDS)" --scorer $(SCORER) --control $(CONTROL) $(HEADLINE_ARGS)

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

# ---- make demo-feedback: AI feedback from a learned scorer, human feedback from simulated people, both
# judged by an oracle that labelled nothing (prefpipe/demo/oracle.py reads colours and shape from pixels).
# On make demo's base model and candidates (built if absent): a CLIP trained here on the drawn world
# (cached by config in CLIP_MODEL, open_clip format) labels pairs; the control trains on them reversed;
# simulated annotators judge pairs of the same candidates into Pick-a-Pic v2 shards that `ingest pickapic`
# reads; the CLIP relabels the human pairs (its agreement with them). Four DPO runs (human, ai, both,
# control) side by side, one eval of all on the held-out prompts, then the oracle's headline (`--check`:
# fails unless the CLIP arm beats the base on shape colour and the control does not).
FB_DIR           ?= $(WORKDIR)/feedback
CLIP_MODEL       ?= $(WORKDIR)/models/clip
CLIP_ARGS        ?= --no-progress
FB_LABEL_ARGS    ?= --strategy random-k --k 3 --no-progress
FB_ANNOTATE_ARGS ?= --pairs-per-prompt 3 --agreement 0.8 --tie-rate 0.1
# make demo's recipe at half the steps and twice the rate: four runs must fit the time budget (measured on the
# CLIP arm: 45.1% held-out shape colour, as 46.0% with 200 steps at 1e-3)
FB_TRAIN_ARGS    ?= --beta 500 --learning-rate 2e-3 --lora-rank 8 --lora-targets attn,ff,conv --batch-size 32 \
                    --max-steps 100 --checkpoint-every 0 --no-progress
FB_EVAL_ARGS     ?= $(EVAL_ARGS)
FB_HEADLINE_ARGS ?= --check
FB_ARMS    := human ai both control
FB_CLIP    := $(CLIP_MODEL)/open_clip_model.safetensors
FB_SCORER  := --scorer clip --weights clip=$(CLIP_MODEL)
FB_SOURCES_human   := --source human
FB_SOURCES_ai      := --source ai
FB_SOURCES_both    := --source human --source ai
FB_SOURCES_control := --pairs $(FB_DIR)/pairs/ai-reversed
FB_PAIRS_human     := $(FB_DIR)/pairs/human/.complete
FB_PAIRS_ai        := $(FB_DIR)/pairs/ai/.complete
FB_PAIRS_both      := $(FB_DIR)/pairs/human/.complete $(FB_DIR)/pairs/ai/.complete
FB_PAIRS_control   := $(FB_DIR)/pairs/ai-reversed/.complete
# per-image arms (Diffusion-KTO on `prefpipe feedback --from scores`: each prompt's top and bottom candidates by the
# CLIP), used by make demo-feedback-long: the CLIP's scores, and the same scores negated (the control). They sample
# their own, larger candidate set (FB_KTO_PER_PROMPT per training prompt) and keep each prompt's top and bottom sixth:
# the more candidates the CLIP ranks, the more right images it finds (issue 17's recipe search, README).
FB_KTO_PER_PROMPT  ?= 48
FB_KTO_CUTS        ?= --desirable-top 0.17 --undesirable-bottom 0.17
FB_KTO_DIR         ?= $(FB_DIR)/kto
FB_KTO_CANDIDATES   = $(FB_KTO_DIR)/candidates
# (after FB_TRAIN_ARGS, so that its --beta and --max-steps win: KTO's beta scaled as make compare scales it.
# demo-feedback-long's FBL_KTO_STEPS, 2000 steps of 32 images, is twice its DPO arm's denoiser forwards: 2 per image
# against 4 per pair; at the same forwards, 1000 steps, the recipe gave 82.6-85.7% over 3 seeds, README)
FB_KTO_ARGS        ?= --objective kto --beta 100
FB_SOURCES_ai-kto      = --feedback $(FB_KTO_DIR)/feedback/ai --images $(FB_KTO_CANDIDATES)
FB_SOURCES_control-kto = --feedback $(FB_KTO_DIR)/feedback/control --images $(FB_KTO_CANDIDATES)
FB_EXTRA_ai-kto        = $(FB_KTO_ARGS)
FB_EXTRA_control-kto   = $(FB_KTO_ARGS)
FB_PAIRS_ai-kto        = $(FB_KTO_DIR)/feedback/ai/.complete
FB_PAIRS_control-kto   = $(FB_KTO_DIR)/feedback/control/.complete

.PHONY: demo-feedback demo-clip

demo-feedback: install
	$(MAKE) --no-print-directory -j2 demo-clip $(MODEL_DEP) $(PROMPTS_DEP) $(EVAL_PROMPTS_DEP)
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(MAKE) --no-print-directory generate
	$(MAKE) --no-print-directory -j2 $(FB_DIR)/relabel/agreement.json $(foreach a,$(FB_ARMS),$(FB_DIR)/runs/$(a)/.complete)
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(MAKE) --no-print-directory $(FB_DIR)/eval/report.json
	$(PREFPIPE) demo-feedback-headline --eval $(FB_DIR)/eval --agreement $(FB_DIR)/relabel/agreement.json \
	    --annotators $(FB_DIR)/pickapic/annotators.json --clip-record $(CLIP_MODEL)/prefpipe_demo_clip.json \
	    --compressibility-eval $(WORKDIR)/eval-compressibility $(FB_HEADLINE_ARGS)

# demo-feedback always asks: it trains only when CLIP_MODEL does not hold this config (its record says), so
# the weights file changes only when retrained, and then what the CLIP labelled is labelled again
demo-clip $(FB_CLIP): | $(STAMP)
	$(PREFPIPE) demo-clip --out $(CLIP_MODEL) $(CLIP_ARGS)

# Each step clears its output first: make runs it only when an input changed, and a stage resumes into a
# folder whose options match (the CLIP's path would, its weights would not).
$(FB_DIR)/pairs/ai/.complete: $(CANDIDATES)/.complete $(FB_CLIP)
	rm -rf $(FB_DIR)/scores $(FB_DIR)/pairs/ai
	$(PREFPIPE) label $(FB_SCORER) --candidates $(CANDIDATES) --out $(FB_DIR) $(FB_LABEL_ARGS)
	@touch $@

$(FB_DIR)/pairs/ai-reversed/.complete: $(FB_DIR)/pairs/ai/.complete
	$(PREFPIPE) demo-reverse --pairs $(FB_DIR)/pairs/ai --out $(FB_DIR)/pairs/ai-reversed
	@touch $@

# The per-image arms' candidates and the CLIP's scores of them (`label` writes its scores beside its pairs; the
# pairs, best against worst, are not used). Generated on DEMO_GEN_THREADS threads, as the demo's candidates.
$(FB_KTO_CANDIDATES)/.complete: $(MODEL_DEP) $(PROMPTS_DEP) | $(STAMP)
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(PREFPIPE) generate --model $(MODEL) --prompts $(PROMPTS) \
	    --per-prompt $(FB_KTO_PER_PROMPT) --out $(FB_KTO_CANDIDATES) $(GEN_ARGS)
	@touch $@

$(FB_KTO_DIR)/scores/.complete: $(FB_KTO_CANDIDATES)/.complete $(FB_CLIP)
	rm -rf $(FB_KTO_DIR)/scores $(FB_KTO_DIR)/pairs
	$(PREFPIPE) label $(FB_SCORER) --candidates $(FB_KTO_CANDIDATES) --out $(FB_KTO_DIR) --no-progress
	@touch $@

$(FB_KTO_DIR)/scores-reversed/.complete: $(FB_KTO_DIR)/scores/.complete
	rm -rf $(FB_KTO_DIR)/scores-reversed
	$(PREFPIPE) demo-reverse --scores $(FB_KTO_DIR)/scores --out $(FB_KTO_DIR)/scores-reversed
	@touch $@

$(FB_KTO_DIR)/feedback/ai/.complete: $(FB_KTO_DIR)/scores/.complete
	rm -rf $(@D)
	$(PREFPIPE) feedback --from scores --in $(FB_KTO_DIR)/scores --out $(@D) $(FB_KTO_CUTS)
	@touch $@

$(FB_KTO_DIR)/feedback/control/.complete: $(FB_KTO_DIR)/scores-reversed/.complete
	rm -rf $(@D)
	$(PREFPIPE) feedback --from scores --in $(FB_KTO_DIR)/scores-reversed --out $(@D) $(FB_KTO_CUTS)
	@touch $@

$(FB_DIR)/pickapic/annotators.json: $(CANDIDATES)/.complete
	$(PREFPIPE) demo-annotate --candidates $(CANDIDATES) --out $(FB_DIR)/pickapic --force $(FB_ANNOTATE_ARGS)

$(FB_DIR)/pairs/human/.complete: $(FB_DIR)/pickapic/annotators.json
	rm -rf $(FB_DIR)/pairs/human
	$(PREFPIPE) ingest pickapic --from $(FB_DIR)/pickapic/data --out $(FB_DIR) --no-progress
	@touch $@

$(FB_DIR)/relabel/agreement.json: $(FB_DIR)/pairs/human/.complete $(FB_CLIP)
	rm -rf $(FB_DIR)/relabel
	$(PREFPIPE) label $(FB_SCORER) --pairs $(FB_DIR)/pairs/human --out $(FB_DIR) --no-progress

.SECONDEXPANSION:
$(FB_DIR)/runs/%/.complete: $$(FB_PAIRS_$$*) $(MODEL_DEP)
	rm -rf $(@D)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PREFPIPE) train --model $(MODEL) $(FB_SOURCES_$*) --workdir $(FB_DIR) \
	    --out $(@D) $(FB_TRAIN_ARGS) $(FB_EXTRA_$*)
	@touch $@

# the eval drops every prompt that an evaluated arm trained on (pairs or per-image feedback)
FB_HOLDOUT = $(sort $(foreach a,$(FB_ARMS),$(patsubst %/.complete,%,$(FB_PAIRS_$(a)))))
$(FB_DIR)/eval/report.json: $(foreach a,$(FB_ARMS),$(FB_DIR)/runs/$(a)/.complete) $(EVAL_PROMPTS_DEP)
	rm -rf $(FB_DIR)/eval
	$(PREFPIPE) eval --base $(MODEL) $(foreach a,$(FB_ARMS),--tuned $(a)=$(FB_DIR)/runs/$(a)) --prompts $(EVAL_PROMPTS) \
	    $(FB_SCORER) --per-prompt $(EVAL_PER_PROMPT) $(addprefix --holdout ,$(FB_HOLDOUT)) \
	    --out $(FB_DIR)/eval $(FB_EVAL_ARGS)

# ---- make demo-feedback-long: only the CLIP arms and their controls (reversed pairs, negated scores), by
# demo-feedback's own rules in their own folder, with a stronger recipe: every pair of a prompt's 6 candidates (15,
# not 3 at random) and 5x the steps (FBL_STEPS).
# Issue 17's figures.
# Also the per-image arms: Diffusion-KTO on the CLIP's scores of FB_KTO_PER_PROMPT (48) fresh candidates per
# training prompt (each prompt's top sixth desirable, the bottom sixth undesirable; `prefpipe feedback --from scores`)
# and on the same scores negated (the control), at FBL_KTO_STEPS steps of 32 images at learning rate 1e-3.
FBL_DIR   ?= $(WORKDIR)/feedback-long
FBL_STEPS ?= 500
FBL_KTO_STEPS ?= 2000
# the KTO arms' training seed (data order, noise, timesteps); make demo-feedback-seeds runs several
FBL_SEED  ?= 0
FBL_ARMS  ?= ai control ai-kto control-kto
FBL_VARS   = FB_DIR=$(FBL_DIR) FB_ARMS="$(FBL_ARMS)" FB_LABEL_ARGS="--strategy all --no-progress" \
             FB_TRAIN_ARGS="--beta 500 --learning-rate 2e-3 --lora-rank 8 --lora-targets attn,ff,conv \
             --batch-size 32 --max-steps $(FBL_STEPS) --checkpoint-every 0 --no-progress" \
             FB_KTO_ARGS="--objective kto --beta 100 --learning-rate 1e-3 --max-steps $(FBL_KTO_STEPS) --seed $(FBL_SEED)"
.PHONY: demo-feedback-long

demo-feedback-long: install
	$(MAKE) --no-print-directory -j2 demo-clip $(MODEL_DEP) $(PROMPTS_DEP) $(EVAL_PROMPTS_DEP)
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(MAKE) --no-print-directory generate
	$(MAKE) --no-print-directory -j2 $(FBL_VARS) $(foreach a,$(FBL_ARMS),$(FBL_DIR)/runs/$(a)/.complete)
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(MAKE) --no-print-directory $(FBL_VARS) $(FBL_DIR)/eval/report.json
	$(PREFPIPE) demo-feedback-headline --eval $(FBL_DIR)/eval --clip-record $(CLIP_MODEL)/prefpipe_demo_clip.json \
	    $(FB_HEADLINE_ARGS)

# ---- make demo-feedback-seeds: demo-feedback-long's per-image arms (ai-kto, control-kto) once per KTO training
# seed in FBL_SEEDS, each in FBL_DIR-seed-K, all on demo-feedback-long's candidates, CLIP scores and labels (FBL_DIR/kto);
# each seed prints its oracle headline. The spread the recipe's figure carries.
FBL_SEEDS ?= 0 1 2
.PHONY: demo-feedback-seeds

demo-feedback-seeds: install
	for k in $(FBL_SEEDS); do \
	    $(MAKE) --no-print-directory demo-feedback-long FBL_ARMS="ai-kto control-kto" FBL_SEED=$$k \
	        FBL_DIR=$(FBL_DIR)-seed-$$k FB_KTO_DIR=$(FBL_DIR)/kto || exit 1; \
	done

# ---- make compare: DPO, MaPO, KTO and SFT side by side on make demo's base model and candidates, each trained on
# the reward's pairs and on the control's (the opposite reward), with one budget of denoiser forwards
# (demo-compare's --budget: DPO's 200 steps x 32 pairs x 4), the same seed and optimizer; one eval of all against
# the base on the held-out prompts; one markdown table (COMPARE_DIR/table.md). prefpipe/demo/compare.py says
# what is held equal and how the published defaults are scaled.
COMPARE_DIR  ?= $(WORKDIR)/compare
COMPARE_ARGS ?= --jobs 2 --threads $(DEMO_THREADS)
.PHONY: compare

compare: install
	OMP_NUM_THREADS=$(DEMO_GEN_THREADS) $(MAKE) --no-print-directory generate $(EVAL_PROMPTS_DEP)
	$(MAKE) --no-print-directory -j2 label SCORER=$(SCORER) label-control
	$(PREFPIPE) demo-compare --model $(MODEL) --pairs $(LABELED)/pairs/ai --control-pairs $(WORKDIR)/label-$(CONTROL)/pairs/ai \
	    --prompts $(EVAL_PROMPTS) --workdir $(COMPARE_DIR) --scorer $(SCORER) $(COMPARE_ARGS)

.PHONY: label-control
label-control:
	$(MAKE) --no-print-directory label SCORER=$(CONTROL)

clean:
	rm -rf work .pytest_cache test-artifacts
