# Two commands are the contract (see README): `make demo` and `make test`.
# Both create .venv and install the project on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# DATA=path/to/hm_dir uses real H&M files; empty = the built-in synthetic shop.
DATA   ?=
HM     ?= ../shared/data/hm_lastweek

.PHONY: setup tools audit lint soak overload filtered-recall bench-scale gpu-check demo test test-unit train export serve-triton stop-triton serve hm eval inspect bench k8s-check images clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@$(PY) -c "import numpy; assert numpy.__version__ < '2', 'numpy<2 is required by the Triton python stub'"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py $(if $(DATA),--data-dir $(DATA))

test: setup tools audit lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# ruff (lint + format) over the tree, mypy over the library layer (twotower/, serving/): settings in pyproject.toml.
lint: setup
	$(PY) -m ruff check --no-cache .
	$(PY) -m ruff format --check --no-cache .
	$(PY) -m mypy

# pip-audit over .venv; fails on a known vulnerability, reports (without failing) when offline.
audit: setup
	$(PY) tools/dependency_audit.py

# Debian's prometheus (scrape test), chromium (browser test), redis-server (purchases shared by replicas) and
# haproxy (the admission sidecar); installed when running as root, else those tests skip with the reason.
tools:
	@missing=""; command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v haproxy >/dev/null 2>&1 || missing="$$missing haproxy"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
		|| echo "not installed:$$missing (tests/test_prometheus.py, test_browser.py, test_redis.py, test_admission_proxy.py will skip)"; }

test-unit: setup
	$(PY) -m pytest -q -m "not integration and not hm"

# Step by step (what `make demo` does in one go):
data/synthetic/articles.csv: | setup
	$(PY) -m twotower.data.synthetic --out data/synthetic

train: setup $(if $(DATA),,data/synthetic/articles.csv)
	$(PY) -m twotower.train --data-dir $(or $(DATA),data/synthetic) --out runs/demo --force

export: setup
	$(PY) -m export --run runs/demo --data-dir $(or $(DATA),data/synthetic) \
		--model-repository model_repository --index-dir artifacts/index

serve-triton: setup
	$(PY) -m localtriton start --model-repository model_repository

stop-triton: setup
	$(PY) -m localtriton stop

serve: setup
	$(PY) -m retriever --index-dir artifacts/index --predictor_host 127.0.0.1:8000 --http_port 8080

# The full H&M catalogue (105,542 articles): train, export, index.
# The frozen text encoder's features of each caption and query phrase, kept between runs (the first
# H&M run encodes 105k captions: ~30 min on 2 cores; later runs read them).
TEXT_FEATURE_CACHE ?= runs/text-features
hm: setup
	$(PY) -m twotower.train --data-dir $(HM) --out runs/hm --force --epochs 1 --text-feature-cache $(TEXT_FEATURE_CACHE)
	$(PY) -m export --run runs/hm --data-dir $(HM) --model-repository model_repository --index-dir artifacts/index

# Quality on real H&M data, temporal split (target = the last day). The model must not see the
# target day: train with --until. Writes reports/hm_lastweek/eval.{json,md,png}.
CUTOFF ?= 2020-09-22
# Customers left out of training (by a hash of their id): the evaluation's split by customer.
UNSEEN ?= 0.1
eval: setup
	$(PY) -m twotower.train --data-dir $(HM) --out runs/hm-eval --force --until $(CUTOFF) \
		--unseen-customer-share $(UNSEEN) --text-feature-cache $(TEXT_FEATURE_CACHE) $(TRAIN_ARGS)
	$(PY) -m export --run runs/hm-eval --data-dir $(HM) --model-repository runs/hm-eval/model_repository \
		--index-dir runs/hm-eval/index
	$(PY) -m evaluation --data-dir $(HM) --cutoff $(CUTOFF) --index-dir runs/hm-eval/index \
		--model-repository runs/hm-eval/model_repository --out reports/hm_lastweek

inspect: setup
	$(PY) -m evaluation.inspect_recs --data-dir $(HM) --cutoff $(CUTOFF) --index-dir runs/hm-eval/index \
		--model-repository runs/hm-eval/model_repository --customers 5

# Serving latency under open-loop load + in-process baseline + offline costs -> docs/benchmarks.{md,json,png}
# (full H&M catalogue when $(HM) exists; artifacts are reused from runs/bench between runs). Serves the
# model `make eval` trained when runs/hm-eval exists: ANN recall is only honest for a trained model.
BENCH_RUN ?= $(wildcard runs/hm-eval/model.pt)
bench: setup
	$(PY) -m benchmarks.serving $(if $(BENCH_RUN),--run-dir $(dir $(BENCH_RUN))) $(BENCH_ARGS)

# 10 minutes at 100 QPS through the served path: errors, latency per minute, RSS (docs/soak.md);
# SOAK_ARGS=--proxy: through the HAProxy admission sidecar, as the raw and cpu overlays serve.
soak: setup
	$(PY) -m benchmarks.soak $(if $(BENCH_RUN),--run-dir $(dir $(BENCH_RUN))) --minutes $(or $(SOAK_MINUTES),10) --rate $(or $(SOAK_RATE),100) $(SOAK_ARGS)

# Twice the saturating rate for 60 s, with and without the admission limit, then recovery (docs/overload.md).
overload: setup tools
	$(PY) -m benchmarks.overload $(if $(BENCH_RUN),--run-dir $(dir $(BENCH_RUN))) --saturating-rate $(or $(SATURATING_RATE),600)

# Synthetic catalogues of 1M articles (10M: make bench-scale SCALE_SIZES=1000000,10000000), one index per
# type, vectors stored in float16 (export --vector-dtype float16): build time, memory, recall@10 vs exact,
# latency, filtered recall, the served path under a 4 Gi memory cgroup (docs/scale.md). The articles imitate
# make eval's export, else make bench's, which a checkout with neither builds first (as make bench would).
SCALE_SIZES ?= 1000000
bench-scale: setup
	$(PY) -m benchmarks.scale --sizes $(SCALE_SIZES)
	$(PY) -m benchmarks.lexical_scale --sizes 105542,1000000

# On a GPU machine with PyTorch: the exported towers and the search on CUDA beside the CPU at batch
# 1/16/64, one table, nothing from the network (runs as is without a GPU: CPU rows only). It serves make eval's
# export, else make bench's, which a fresh checkout builds first.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check

# Recall of filtered searches vs exact filtered search on the bench index (docs/filters.md).
filtered-recall: setup
	$(PY) -m benchmarks.filtered_recall

# Render every k8s overlay and validate it (schemas + our rules); also part of `make test`.
k8s-check: setup
	$(PY) k8s/check.py

# Container images; needs a Docker engine (there is none on the CPU dev machines).
IMAGE_TAG ?= 0.1.0
images:
	@docker info >/dev/null 2>&1 || { echo "no Docker engine here: images not built"; exit 1; }
	docker build -f docker/retriever.Dockerfile -t ghcr.io/hm-two-tower/retriever:$(IMAGE_TAG) .
	docker build -f docker/retriever.Dockerfile --build-arg FAISS=faiss-gpu-cu12 -t ghcr.io/hm-two-tower/retriever:$(IMAGE_TAG)-gpu .

clean:
	rm -rf data runs artifacts .localtriton model_repository/item_tower model_repository/user_tower model_repository/query_tower
