"""Benchmark the OpenAI-compatible server under 16 concurrent streaming clients.

Starts ``qwen-ondevice serve MODEL`` itself on 127.0.0.1 (a free port), then

1. baseline: every request once, one after another (streaming, fixed seeds);
2. concurrent: CLIENTS clients at once, each sending its REQUESTS requests in turn.

It checks that every request completes without error and that each concurrent output equals
the sequential output for the same seed, prints p50/p95 time to first token (first content
chunk, seconds), latency and tokens/s per phase with the concurrent/baseline ratio, and stops the
server. The whole run is bounded by --deadline seconds. Exit status 0 only if all checks pass.

    python benchmarks/bench_server.py                 # demo model, torch backend
    python benchmarks/bench_server.py path/to/bundle  # an exported bundle (ort-cpu by default)

Talks only to 127.0.0.1; proxies from the environment are ignored.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

QUESTIONS = [
    "Write a Python function that reverses a string.",
    "What is a linked list?",
    "Explain recursion in one sentence.",
    "How do I read a file in C?",
    "What does HTTP 404 mean?",
    "Name a sorting algorithm and its complexity.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that counts rows in a table.",
]


@dataclass
class Result:
    key: tuple[int, int]  # (client, request)
    text: str
    completion_tokens: int
    ttft: float  # seconds from sending the request to the first content chunk
    latency: float  # seconds from sending the request to [DONE]
    error: str | None = None


def request_body(client: int, k: int, max_tokens: int) -> dict:
    """The fixed request of client ``client``'s ``k``-th turn (seeded sampling)."""
    q = QUESTIONS[(client * 3 + k) % len(QUESTIONS)]
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": q}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 1000 + 16 * k + client,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(http: httpx.AsyncClient, key, body) -> Result:
    t0 = time.perf_counter()
    ttft, pieces, usage = None, [], None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(key, "", 0, 0.0, 0.0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Result(key, "", 0, 0.0, 0.0, obj["error"]["message"])
                if obj.get("usage"):
                    usage = obj["usage"]
                for c in obj["choices"]:
                    piece = c["delta"].get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        pieces.append(piece)
            if not done:
                return Result(key, "", 0, 0.0, 0.0, "stream ended without [DONE]")
    except httpx.HTTPError as e:
        return Result(key, "", 0, 0.0, 0.0, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    return Result(key, "".join(pieces), usage["completion_tokens"] if usage else 0, ttft or latency, latency)


async def run_phase(base_url: str, clients: int, requests: int, max_tokens: int, concurrent: bool) -> tuple[list[Result], float]:
    """All clients x requests; concurrently (each client in turn) or strictly one after another.
    Returns the results and the phase's wall time in seconds."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, trust_env=False, limits=limits) as http:

        done = 0
        phase = f"{clients} clients" if concurrent else "sequential"

        async def client_loop(c):
            nonlocal done
            out = []
            for k in range(requests):
                out.append(await one_request(http, (c, k), request_body(c, k, max_tokens)))
                done += 1
                if done % 8 == 0 or done == clients * requests:
                    print(f"  {phase}: {done}/{clients * requests} requests", file=sys.stderr, flush=True)
            return out

        t0 = time.perf_counter()
        if concurrent:
            per_client = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        else:
            per_client = [await client_loop(c) for c in range(clients)]
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen_ondevice.cli.main", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--context-length", str(args.context_length), "--log-level", "warning"]
    if args.backend:
        cmd += ["--backend", args.backend]
    env = dict(os.environ)
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(src)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(base_url: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready in time")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # the process group this script started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear interpolation."""
    return float(np.percentile(values, q))


def summarize(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok]
    lat = [r.latency for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    decode = [(r.completion_tokens - 1) / (r.latency - r.ttft) for r in ok if r.completion_tokens > 1 and r.latency > r.ttft]
    return {
        "phase": name,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50": pct(ttft, 50) if ttft else float("nan"),
        "ttft_p95": pct(ttft, 95) if ttft else float("nan"),
        "lat_p50": pct(lat, 50) if lat else float("nan"),
        "lat_p95": pct(lat, 95) if lat else float("nan"),
        "tokens": tokens,
        "wall": wall,
        "agg_tps": tokens / wall if wall > 0 else 0.0,
        "req_tps_p50": pct(decode, 50) if decode else float("nan"),
    }


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    head = f"{'phase':<12}{'reqs':>6}{'errors':>8}{'TTFT p50 s':>12}{'TTFT p95 s':>12}{'lat p50 s':>11}{'lat p95 s':>11}" \
           f"{'tokens':>8}{'wall s':>9}{'agg tok/s':>11}{'x base':>8}{'req tok/s p50':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["agg_tps"] / base["agg_tps"] if base["agg_tps"] else float("nan")
        print(f"{r['phase']:<12}{r['requests']:>6}{r['errors']:>8}{r['ttft_p50']:>12.3f}{r['ttft_p95']:>12.3f}"
              f"{r['lat_p50']:>11.3f}{r['lat_p95']:>11.3f}{r['tokens']:>8}{r['wall']:>9.1f}{r['agg_tps']:>11.2f}"
              f"{ratio:>8.2f}{r['req_tps_p50']:>15.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="demo", help="MODEL to serve (default: demo, on the torch backend)")
    ap.add_argument("--backend", default=None, help="default: torch for a checkpoint, ort-cpu for a bundle")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--deadline", type=float, default=1500, help="seconds for the whole run, server start included")
    args = ap.parse_args(argv)

    deadline = time.monotonic() + args.deadline
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_server_{port}.log"
    proc = start_server(args, port, log_path)
    print(f"server: {args.model} on {base_url} (log {log_path})", file=sys.stderr)
    try:
        wait_ready(base_url, proc, deadline)
        budget = deadline - time.monotonic()

        async def both():
            seq = await asyncio.wait_for(run_phase(base_url, args.clients, args.requests, args.max_tokens, False), budget / 2)
            conc = await asyncio.wait_for(
                run_phase(base_url, args.clients, args.requests, args.max_tokens, True), max(deadline - time.monotonic(), 1)
            )
            return seq, conc

        (seq, seq_wall), (conc, conc_wall) = asyncio.run(both())
    except (TimeoutError, asyncio.TimeoutError):
        print(f"FAILED: the run exceeded its deadline of {args.deadline:.0f} s", file=sys.stderr)
        return 1
    finally:
        stop_server(proc)

    rows = [summarize("sequential", seq, seq_wall), summarize(f"{args.clients} clients", conc, conc_wall)]
    print(f"\nserver benchmark: {args.model}, {args.clients} clients x {args.requests} streaming requests, "
          f"max_tokens {args.max_tokens}, temperature 0.7, fixed seeds (baseline: the same requests one at a time)\n")
    print_table(rows)
    seq_text = {r.key: r.text for r in seq if r.error is None}
    errors = [r for r in seq + conc if r.error is not None]
    mismatched = [r.key for r in conc if r.error is None and seq_text.get(r.key) != r.text]
    same = sum(1 for r in conc if r.error is None and seq_text.get(r.key) == r.text)
    print(f"\nconcurrent outputs equal to sequential ones: {same}/{len(conc)}")
    for r in errors[:5]:
        print(f"error {r.key}: {r.error}", file=sys.stderr)
    for key in mismatched[:5]:
        print(f"mismatch {key}: {seq_text.get(key)!r} vs {next(r.text for r in conc if r.key == key)!r}", file=sys.stderr)
    if errors or mismatched:
        print("FAILED", file=sys.stderr)
        return 1
    print("OK: every request completed; outputs are independent of concurrency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
