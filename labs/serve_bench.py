"""Servers side by side on loopback: speed (1/4/8 concurrent clients) and load + faults (docs/benchmarks.md, "Serving").

    python labs/serve_bench.py speed gemma3-270m --out bench-serve/        # flashhead serve, --dense, llama-cpp-python
    python labs/serve_bench.py speed gemma3-270m --llama-server PATH       # + llama.cpp's C++ llama-server
    python labs/serve_bench.py load gemma3-270m --tokens 32 [--dense | --batch-invariant]  # 8 x 50 requests, faults

`speed` starts every server on the same GGUF with the same threads, each on its own port, and sends
`clients` concurrent streamed greedy requests of `--tokens` new tokens to one server after the other
(`--rounds` rounds per level, default 5, each round visiting every server with the same prompts), and
reports aggregate tokens/s, time to first token and inter-token latency. Servers: `flashhead serve`
(FlashHead), `flashhead serve --dense` (llama.cpp's own head in the same server), `flashhead serve
--batch-invariant` (each request in its own llama.cpp decode), llama-cpp-python's
server (`pip install 'llama-cpp-python[server]==0.3.36'`: one request at a time), and, given a binary,
llama.cpp's `llama-server --parallel N` (build it with labs/build_llama_server.sh).
`load` runs the fault and load script of issue #24 against `flashhead serve` (or `--dense`, or
`--batch-invariant`) and prints what it saw.
Everything stays on 127.0.0.1 and is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = ["The history of the city begins", "In the morning the village was", "The report describes how the",
           "She opened the letter and read", "The committee met to discuss the", "A long road ran through the",
           "The first chapter of the book tells", "After the storm the fishermen", "The scientist explained that the",
           "On the last day of summer the"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One server process, started and waited for; ``kind`` names it in the table."""

    def __init__(self, kind: str, cmd: list[str], port: int, health: str) -> None:
        self.kind, self.url = kind, f"http://127.0.0.1:{port}"
        # the log goes to a file: llama.cpp writes enough while loading to fill a pipe nobody reads
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{kind} exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{kind} did not become healthy in 600 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def flash_cmd(model: str, threads: int, parallel: int, port: int, *extra: str) -> list[str]:
    """The command line of `flashhead serve` with these settings (``extra``: e.g. ``--dense``)."""
    return [sys.executable, "-m", "flashhead.cli", "serve", model, "--threads", str(threads), "--parallel",
            str(parallel), "--n-ctx", "1024", "--port", str(port), *extra]


def servers(model: str, gguf: str, threads: int, parallel: int,
            llama_server: str | None) -> list[tuple[str, list[str], str, int]]:
    """(name, command, health route, port) of each server to compare, each on a free port of its own."""
    out = []
    for kind, extra in (("flashhead serve", []), ("flashhead serve --dense", ["--dense"]),
                        ("flashhead serve --batch-invariant", ["--batch-invariant"])):
        port = free_port()
        out.append((kind, flash_cmd(model, threads, parallel, port, *extra), "/health", port))
    port = free_port()
    out.append(("llama-cpp-python server", [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads",
                                            str(threads), "--n_ctx", "1024", "--interrupt_requests", "False",
                                            "--host", "127.0.0.1", "--port", str(port)], "/v1/models", port))
    if llama_server:
        port = free_port()
        out.append(("llama-server", [llama_server, "-m", gguf, "-t", str(threads), "-tb", str(threads), "--parallel",
                                     str(parallel), "-c", str(1024 * parallel), "--host", "127.0.0.1", "--port",
                                     str(port)], "/health", port))
    return out


def stream_one(url: str, prompt: str, tokens: int) -> dict:
    """One streamed greedy completion: time to first chunk, gaps between chunks, chunks counted as tokens."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "model": "m"}
    t0, stamps, text = time.perf_counter(), [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0].get("text", "") if chunk.get("choices") else ""
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": gaps, "tokens": len(stamps),
            "text": "".join(text), "end": time.perf_counter()}


def one_round(srv: Served, n: int, r: int, tokens: int) -> dict:
    """``n`` concurrent streamed requests (round ``r``'s prompts): aggregate tokens/s, median TTFT and gap."""
    prompts = [PROMPTS[(r * n + i) % len(PROMPTS)] for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(lambda p: stream_one(srv.url, p, tokens), prompts))
    wall = max(g["end"] for g in got) - t0
    return {"tok_s": sum(g["tokens"] for g in got) / wall, "ttft": statistics.median(g["ttft"] for g in got),
            "itl": statistics.median(x for g in got for x in g["gaps"])}


def speed(args) -> dict:
    """All servers up at once, each on its own port (idle ones sleep); every round visits them in turn, so a
    machine whose speed drifts slows all alike."""
    from flashhead.models import resolve

    gguf = str(resolve(args.model)[1])
    results, started = {}, []
    try:
        for kind, cmd, health, port in servers(args.model, gguf, args.threads, max(args.clients), args.llama_server):
            started.append(Served(kind, cmd, port, health))
            stream_one(started[-1].url, PROMPTS[0], 8)  # warm-up
        for n in args.clients:
            rounds = {srv.kind: [] for srv in started}
            for r in range(args.rounds):
                for srv in started:
                    rounds[srv.kind].append(one_round(srv, n, r, args.tokens))
            for kind, got in rounds.items():
                row = results.setdefault(kind, {})[n] = {k: statistics.median(x[k] for x in got) for k in got[0]}
                print(f"{kind:<34} clients {n}: {row['tok_s']:7.1f} tok/s, TTFT {1000 * row['ttft']:7.1f} ms, "
                      f"ITL {1000 * row['itl']:6.1f} ms", flush=True)
    finally:
        for srv in started:
            srv.stop()
    return results


def load(args) -> dict:
    """8 clients x 50 requests (streamed and not), 20 disconnects mid-stream, 20 malformed requests, 5 oversized
    prompts, against flashhead serve (``--dense``: its llama.cpp head; ``--batch-invariant``); greedy outputs
    compared with a sequential pass (llama.cpp is not batch-invariant: sharing steps, some differ; docs/design.md);
    RSS at the start, after 100 answers, half-way and at the end."""
    port = free_port()
    cmd = flash_cmd(args.model, args.threads, 8, port, *["--dense"] * args.dense,
                    *["--batch-invariant"] * args.batch_invariant)
    srv = Served("flashhead serve", cmd, port, "/health")
    seen = {"5xx": 0, "answered": 0, "well_formed": 0, "4xx_for_bad": 0, "bad": 0, "differ_from_sequential": 0}
    lock, differing = threading.Lock(), set()
    try:
        ref = {p: stream_one(srv.url, p, args.tokens)["text"] for p in PROMPTS}  # sequential reference
        rss = [srv.rss_mb()]

        def client(c: int) -> None:
            for i in range(args.requests):
                p = PROMPTS[(c + i) % len(PROMPTS)]
                kind = (c + i) % 4
                try:
                    if kind == 0:  # a disconnect mid-stream (20 of them in all, then plain requests)
                        with lock:
                            left = seen.setdefault("disconnects", 0) < 20
                            seen["disconnects"] += left
                        if left:
                            with httpx.stream("POST", srv.url + "/v1/completions", timeout=120, json={
                                    "prompt": p, "max_tokens": args.tokens, "temperature": 0, "stream": True}) as r:
                                for j, _ in enumerate(r.iter_lines()):
                                    if j >= 2:
                                        break
                            continue
                    if kind == 1 and seen.get("malformed", 0) < 25:
                        with lock:
                            seen["malformed"] = seen.get("malformed", 0) + 1
                            n_bad = seen["malformed"]
                        payload = (b"{broken" if n_bad <= 20 else
                                   json.dumps({"prompt": "word " * 1200, "max_tokens": 4}).encode())
                        r = httpx.post(srv.url + "/v1/completions", content=payload, timeout=120,
                                       headers={"content-type": "application/json"})
                        with lock:
                            seen["bad"] += 1
                            seen["4xx_for_bad"] += 400 <= r.status_code < 500
                            seen["5xx"] += r.status_code >= 500
                        continue
                    with lock:
                        seen["well_formed"] += 1
                    if kind == 2:
                        text = stream_one(srv.url, p, args.tokens)["text"]
                    else:
                        r = httpx.post(srv.url + "/v1/completions", timeout=600,
                                       json={"prompt": p, "max_tokens": args.tokens, "temperature": 0})
                        with lock:
                            seen["5xx"] += r.status_code >= 500
                        text = r.json()["choices"][0]["text"]
                    with lock:
                        seen["answered"] += 1
                        if text != ref[p]:
                            seen["differ_from_sequential"] += 1
                            differing.add(p)
                        if seen["answered"] in (100, args.clients * args.requests // 2):
                            rss.append(srv.rss_mb())
                except httpx.HTTPError as e:
                    with lock:
                        seen.setdefault("errors", []).append(repr(e))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        rss.append(srv.rss_mb())
        seen.update(seconds=time.perf_counter() - t0, rss_mb=rss, prompts_that_differed=len(differing),
                    healthy_after=httpx.get(srv.url + "/health").status_code == 200)
    finally:
        srv.stop()
    print(json.dumps(seen, indent=2))
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["speed", "load"])
    p.add_argument("model", nargs="?", default="gemma3-270m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request (speed: 128; load: 32 is plenty)")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=50, help="load: requests per client")
    p.add_argument("--dense", action="store_true", help="load: serve llama.cpp's own head (flashhead serve --dense)")
    p.add_argument("--batch-invariant", action="store_true", help="load: flashhead serve --batch-invariant")
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server binary (labs/build_llama_server.sh)")
    p.add_argument("--out", help="folder for the JSON")
    args = p.parse_args(argv)
    if args.mode == "load":
        args.clients = max(args.clients)
    result = speed(args) if args.mode == "speed" else load(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "-dense" * args.dense + "-invariant" * args.batch_invariant
        Path(args.out, f"serve-{args.mode}-{args.model}{tag}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
