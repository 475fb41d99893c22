# Set-up and everyday commands. Everything installs into .venv; nothing is installed globally except
# the Debian packages the Slurm tests need (only when running as root on Debian, e.g. in CI).
VENV    ?= .venv
PYTHON  ?= python3
# Pinned so a fresh machine gets the same, tested build (pip takes it from its local wheel cache when there).
TORCH   ?= torch==2.14.1 torchvision==0.29.1
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The oldest torch the package declares (pyproject.toml), installed in a virtualenv of its own by `make test`
# and tested on the distributed and parallel code (tests marked floor). Keep the two in step.
FLOOR_VENV  ?= .venv-floor
FLOOR_TORCH ?= 'torch===2.13.0' torchvision==0.28.0
FLOOR_STAMP := $(FLOOR_VENV)/.installed
DEMO_DIR ?= runs/demo
SLURM_PACKAGES := slurmctld slurmd slurm-client munge

.PHONY: install demo train test test-fast test-floor gpu-check system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Only what the package itself needs (no trackers or ONNX: the floor tests use neither), from pip's cache when there.
$(FLOOR_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/pip install -q $(FLOOR_TORCH)
	$(FLOOR_VENV)/bin/pip install -q -e . pytest pytest-timeout hypothesis
	touch $(FLOOR_STAMP)

# The main job on the real Fashion-MNIST sample shipped with the package (3,000 training, 615 test images):
# the real 58.3M-parameter AlexNet with the accurate preset, images resized to 64 so that it finishes in a
# few minutes on a CPU (GPUs are used when present).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/dist-alexnet train --config launch/configs/accurate.yaml --dataset fashion-mnist-sample \
		--image-size 64 --batch-size 64 --epochs 6 --log-every 10 --output-dir $(DEMO_DIR)
	@echo "run directory: $(DEMO_DIR) (config.yaml, metrics.json, checkpoints/, tensorboard/)"
	@echo "open TensorBoard: $(BIN)/tensorboard --logdir $(DEMO_DIR)/tensorboard  (then http://localhost:6006)"

# The real job: Fashion-MNIST (downloaded into ./data when missing) on every visible GPU. A crashed worker
# restarts the group (up to WORKER_RESTARTS times), which resumes from the newest checkpoint.
NGPUS = $(shell nvidia-smi -L 2>/dev/null | wc -l)
WORKER_RESTARTS ?= 3
FREE_PORT = $(shell $(PYTHON) -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
train: $(STAMP)
	@if [ "$(NGPUS)" -gt 0 ]; then \
		PET_RDZV_ENDPOINT=127.0.0.1:$(FREE_PORT) TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
		$(BIN)/accelerate launch --config_file launch/accelerate/one_node.yaml \
			--num_processes $(NGPUS) --rdzv_backend c10d --max_restarts $(WORKER_RESTARTS) \
			-m dist_alexnet.cli train $(ARGS); \
	else \
		echo "no GPU found: training on the CPU (slow at 224; try ARGS='--image-size 64')"; \
		$(BIN)/dist-alexnet train $(ARGS); \
	fi

# Speed check on a CUDA machine, about 8 minutes: the benchmark at 224 (bf16, batch 256 and 512, with and
# without torch.compile) and a 3-epoch training run with every GPU; JSON results in the folder
# GPU_CHECK_DIR (default ./gpu-check). Without CUDA it runs the same steps at toy sizes.
gpu-check: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" PYTHON=python bash scripts/gpu_check.sh

# Debian packages for the real-Slurm tests. Installed only when missing and when we may (root + apt).
system-deps:
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SLURM_PACKAGES); \
		else \
			echo "note: Slurm/munge missing and not root with apt-get: the Slurm tests will be skipped"; \
		fi; \
	fi

test: $(STAMP) system-deps test-floor
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The oldest supported torch: one process, two processes under accelerate launch, hybrid and its checkpoints.
test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -m pytest -q -m floor $(PYTEST_ARGS)

# A few minutes: the unit tests and the end-to-end runs that catch most breakage (one process, two processes
# under accelerate launch, exact resume, evaluate/predict, monitoring, bad input). Leaves out the tests marked
# slow: real Slurm, the other launchers, signals, kill -9, full disks, the 2-process health checks and benchmark,
# the GPU check script.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs/demo .pytest_cache
