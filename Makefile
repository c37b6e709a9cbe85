# The README's two commands. Both run the (idempotent) set-up first.
.PHONY: setup demo test

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/flashhead demo

test: setup
	.venv/bin/python -m pytest -q
	.venv-vllm/bin/python -m pytest -q tests/vllm  # the vLLM plugin, in the vLLM environment
