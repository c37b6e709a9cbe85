"""FlashHead in vLLM: flashhead's own open plugin, and the file format of Embedl's closed one.

- ``folder``: the servable model folder (``flashhead export-vllm MODEL --out FOLDER``) and how a
  folder's FlashHead settings are read back, defensively; no vLLM needed.
- ``vendor``: the vendor plugin's asset format (write it, and read it back into an index).
- ``plugin``: the ``vllm.general_plugins`` entry point; registers the FlashHead architectures.
- ``model``: the FlashHead variants of vLLM's Llama, Gemma 3, Qwen2 and Qwen3 causal LMs.
- ``requests``: the ``vllm.logits_processors`` entry point that tells the head, each step, which
  rows sample and at what temperature (vLLM's ``compute_logits`` only gets hidden states).

Only ``plugin``, ``model`` and ``requests`` import vLLM; they run in the vLLM environment
(``.venv-vllm``, see docs/design.md).
"""
