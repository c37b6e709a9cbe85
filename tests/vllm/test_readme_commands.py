"""The README's vLLM commands, run as a user types them: the lines of its "Serving with vLLM" block, in order,
from a shell in an empty folder (with links to the two environments) and a clean environment.

The one-shot `LLM(...)` line must print a continuation and leave no process behind (vLLM's engine core runs in
a subprocess here, as it does for a user); the `vllm serve` line (plus a free `--port`) must answer an
OpenAI completion request and stop on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from vllm_helpers import free_port, post_json, wait_until_healthy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VLLM_LOG = re.compile(r"^(\(\w+( pid=\d+)?\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d ")
TIMEOUT = 900  # seconds for each step: a start takes ~1 min on an idle 2-core machine, much longer on a busy one


def readme_block() -> list[str]:
    """The command lines of the first ```sh block under "## Serving with vLLM" in README.md."""
    section = (REPO / "README.md").read_text().split("## Serving with vLLM", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _clean_env(home: Path) -> dict:
    """What a user's shell has: no VLLM_* or HF_* settings of this test session, no active virtual environment."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(home)), "LANG": "C.UTF-8"}
    if "FLASHHEAD_CACHE" in os.environ:  # the cache the set-up filled (models, indexes)
        env["FLASHHEAD_CACHE"] = os.environ["FLASHHEAD_CACHE"]
    return env


def _group_gone(pgid: int, wait: float = 30.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


def test_the_readme_vllm_commands_work_as_written(tmp_path):
    lines = readme_block()
    assert [line.split()[0] for line in lines] == [".venv/bin/flashhead", "export", ".venv-vllm/bin/python",
                                                   ".venv-vllm/bin/vllm"], "the README's vLLM block changed: update this test"
    for venv in (".venv", ".venv-vllm"):
        (tmp_path / venv).symlink_to(REPO / venv)
    env = _clean_env(tmp_path)
    setup, serve = "\n".join(["set -e", *lines[:3]]), lines[3].split("#")[0].strip()
    proc = subprocess.Popen(["bash", "-c", setup], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (out + err)[-3000:]
    # vLLM logs to stdout too: what is left once its log lines are dropped is what the line printed
    printed = [line for line in out.splitlines() if not VLLM_LOG.match(line)]
    assert "".join(printed).strip(), f"the LLM(...) line printed no continuation:\n{out[-3000:]}"
    assert _group_gone(proc.pid), "the LLM(...) line left a vLLM process running"

    port = free_port()
    log = tmp_path / "serve.log"
    exported = dict(v.split("=", 1) for v in lines[1].split("#")[0].split()[1:])  # the block's export line
    assert exported == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    serve_env = {**env, **exported}
    with open(log, "w") as f:
        server = subprocess.Popen(["bash", "-c", f"exec {serve} --host 127.0.0.1 --port {port}"], cwd=tmp_path,
                                  env=serve_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}", log, TIMEOUT)
        body = {"model": "served/gemma", "prompt": "Hello", "max_tokens": 8, "temperature": 0.0}
        answer = post_json(f"http://127.0.0.1:{port}/v1/completions", body)
        assert answer["choices"][0]["text"].strip() and answer["usage"]["completion_tokens"] > 0
        assert "FlashHead (flashhead index)" in log.read_text()  # the plugin's head served it
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=120) is not None and _group_gone(server.pid), "vllm serve did not stop on SIGTERM"
    finally:
        if server.poll() is None or not _group_gone(server.pid, wait=0):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
