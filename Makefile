# The README's two commands. Both run the (idempotent) set-up first.
.PHONY: setup demo test

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/flashhead demo

test: setup
	.venv/bin/python -m pytest -q
