# The README's two commands. Both run the (idempotent) set-up first.
.PHONY: setup demo test

# the tests of the compiled kernels and of the head that calls them (synthetic data, ~1 min a target)
KERNEL_TESTS = tests/test_kernels.py tests/test_head.py tests/test_q8.py tests/test_cluster.py

setup:
	./scripts/setup.sh

# the demo sets up only what it uses (no llama.cpp build, no vLLM environment: scripts/setup.sh --demo)
demo:
	./scripts/setup.sh --demo
	.venv/bin/flashhead demo

# The main suite runs the kernels built for this CPU (-march=native); the kernel tests then run once more for
# each named instruction-set target this CPU can execute whose path differs from the native one (AVX2 without
# VNNI, no AVX2, AVX-512 VNNI), so the paths other CPUs take run here too (flashhead/_kernels.py,
# FLASHHEAD_KERNEL_ARCH; each build is cached under its own key).
test: setup
	.venv/bin/python -m pytest -q
	@for arch in $$(.venv/bin/python -c "from flashhead._kernels import other_path_archs; print(*other_path_archs())"); do \
	  echo "==> kernel tests with FLASHHEAD_KERNEL_ARCH=$$arch"; \
	  FLASHHEAD_KERNEL_ARCH=$$arch .venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(KERNEL_TESTS) || exit 1; \
	done
	.venv-vllm/bin/python -m pytest -q tests/vllm  # the vLLM plugin, in the vLLM environment
