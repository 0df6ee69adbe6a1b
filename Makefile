# The two front-door commands: `make demo` and `make test`. Each creates and fills .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint bench data transformers-sdist

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: these install from local wheels here, and the CPU-only torch 2.13 cannot load PyPI's torchvision.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,onnx]'
	touch $(STAMP)

# The embedded default dataset: Debian's dataset-fashion-mnist (needs root or sudo the first time).
data:
	@test -f $(FASHION_MNIST) || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# transformers' common model tests ship in its sdist, not its wheel: tests/test_transformers_common.py runs them
# from .transformers_sdist/ and skips when this step could not download them (offline). In CI (CI=true) a failed
# download fails this step, loudly, and the test module fails too.
transformers-sdist: $(STAMP)
	@version=$$($(PY) -c "import transformers; print(transformers.__version__)"); \
	test -f .transformers_sdist/transformers-$$version/tests/test_modeling_common.py || { \
		mkdir -p .transformers_sdist && \
		$(PY) -m pip download -q --no-binary :all: --no-deps transformers==$$version -d .transformers_sdist && \
		tar xzf .transformers_sdist/transformers-$$version.tar.gz -C .transformers_sdist transformers-$$version/tests; \
	} || { \
		case "$$CI" in \
			1|true|TRUE|True|yes) echo "ERROR: transformers $$version sdist could not be downloaded, and CI=true needs its common model tests" >&2; exit 1;; \
			*) echo "transformers $$version sdist unavailable (offline?): its common model tests will be skipped";; \
		esac; \
	}

demo: $(STAMP) data
	$(VENV)/bin/deit-distill demo --output_dir runs/demo

test: $(STAMP) data transformers-sdist
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/inference.py
	$(PY) bench/train_step.py
