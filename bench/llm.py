"""The LLM router against LiteLLM's proxy: one fake provider, one worker each, measured in one run.

    python bench/llm.py [--duration 5] [--connections 64] [--rounds 1] [--markdown]
                        [--litellm-python /tmp/venv-litellm/bin/python] [--only direct,litellm,...]
                        [--budget] [--state URL] [--bridgeway-cmd "python -m bridgeway serve"]

Rows (every one a non-streaming POST /v1/chat/completions with the same small OpenAI body):
  direct           wrk -> the fake provider (what the load side and the fake can do)
  litellm          wrk -> LiteLLM proxy (its own virtualenv, 1 worker, master key, no database)
                        -> fake OpenAI
  floor            wrk -> the server + one pooled upstream call (bench/llm_floor_app.py) -> fake
                        OpenAI: the server stack Bridgeway runs on, without Bridgeway's own work
  openai           wrk -> Bridgeway (1 worker, an API key) -> fake OpenAI: the pass-through
  openai+budget    the same through a second Bridgeway whose key's role has a budget it never
                   reaches (every request reserves and settles), state in SQLite or --state:
                   its CPU/request over the pass-through's is what a budget costs
  openai>anthropic wrk -> Bridgeway -> fake Anthropic Messages: request and answer translated
  openai>gemini    wrk -> Bridgeway -> fake Gemini generateContent: translated too

The fake provider is nginx answering a fixed body per wire format (`return 200 '...'`): a few
microseconds per request, so it is never what is measured. Each row is measured twice: throughput
with --connections (64) connections, latency with 8 (the targets' "moderate load"; closed loop,
so a server busy for T per request shows about 8 x T) and with 1 (one request's own cost, no
queueing). "added" is the row's latency minus the direct row's at the same concurrency. Targets (issue 4): Bridgeway >= 50 x LiteLLM's requests/s,
<= 1 ms added at p50 and <= 3 ms at p99 (c=8), translation <= 1.5 x the pass-through's CPU per
request. See bench/README.md for pinning, rounds and how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CPU_LOAD,
    CPU_PROXY,
    DEFAULT_BRIDGEWAY_CMD,
    ROOT,
    Procs,
    WrkResult,
    core_jiffies,
    free_port,
    log,
    print_table,
    run_wrk,
    sigterm_as_interrupt,
    start_bridgeway,
    start_nginx,
    tail,
    tree_cpu_seconds,
    wait_http,
)

ROWS = ("direct", "litellm", "floor", "openai", "openai+budget", "openai>anthropic", "openai>gemini")
BUDGET_ROW = "openai+budget"  # a second Bridgeway, a budget on: the pass-through with a reserve and a settle
BRIDGEWAY_ROWS = {
    "openai": "bench-openai",
    "openai>anthropic": "bench-anthropic",
    "openai>gemini": "bench-gemini",
}
DEFAULT_LITELLM_PYTHON = "/tmp/venv-litellm/bin/python"
LATENCY_CONNECTIONS = 8
WARMUP_S = 2.0
LITELLM_WARMUP_S = 6.0  # its first requests import and build things
MIN_VS_LITELLM = 50.0
MAX_ADDED_P50_MS = 1.0
MAX_ADDED_P99_MS = 3.0
MAX_TRANSLATION = 1.5
MAX_OTHER_WORK = 0.15  # a round where other tenants took more of the server's core is set aside

ADMIN_TOKEN = "bench-admin-token-0123456789"
LITELLM_MASTER_KEY = "sk-bench-master-0123456789"
UPSTREAM_KEY = "sk-bench-upstream-0123456789"  # what the fake provider is sent; it checks nothing

# The client's request: a short chat, as most agent calls are.
REQUEST = {
    "model": "MODEL",
    "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello to the benchmark in five words."},
    ],
    "max_tokens": 32,
    "temperature": 0,
}

# The fake provider's answers, one per wire format, each what the real API returns for a short chat.
OPENAI_REPLY = {
    "id": "chatcmpl-bench0123456789",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "gpt-bench",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello there, dear benchmark friend.",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 24, "completion_tokens": 7, "total_tokens": 31},
    "system_fingerprint": "fp_bench",
}
ANTHROPIC_REPLY = {
    "id": "msg_bench0123456789",
    "type": "message",
    "role": "assistant",
    "model": "claude-bench",
    "content": [{"type": "text", "text": "Hello there, dear benchmark friend."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 24, "output_tokens": 7},
}
GEMINI_REPLY = {
    "candidates": [
        {
            "content": {"parts": [{"text": "Hello there, dear benchmark friend."}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {"promptTokenCount": 24, "candidatesTokenCount": 7, "totalTokenCount": 31},
    "modelVersion": "gemini-bench",
    "responseId": "bench0123456789",
}


def fake_provider_server(port: int) -> str:
    """nginx answering the three wire formats with fixed bodies (it discards the request body and
    keeps the connection alive)."""

    def answer(location: str, body: dict) -> str:
        text = json.dumps(body, separators=(",", ":"))
        assert "'" not in text and "$" not in text  # nginx quoting
        return f"        location {location} {{ default_type application/json; return 200 '{text}'; }}"

    return "\n".join(
        [
            "    server {",
            f"        listen 127.0.0.1:{port} reuseport backlog=4096;",
            answer("= /v1/chat/completions", OPENAI_REPLY),
            answer("= /v1/messages", ANTHROPIC_REPLY),
            answer("= /v1beta/models/gemini-bench:generateContent", GEMINI_REPLY),
            "        location / { return 404; }",
            "    }",
        ]
    )


# --budget: one the benchmark never reaches, so every request reserves and settles against it.
BUDGET = "[{period: 1d, usd: 1000000}]"


def bridgeway_config(port: int, up_port: int, state: str = "memory://", budget: bool = False) -> str:
    base = f"http://127.0.0.1:{up_port}"
    deployments = {
        "bench-openai": ("openai", "gpt-bench", f"{base}/v1"),
        "bench-anthropic": ("anthropic", "claude-bench", f"{base}/v1"),
        "bench-gemini": ("gemini", "gemini-bench", f"{base}/v1beta"),
    }
    models = "\n".join(
        f"  {name}: {{deployments: [{{provider: {provider}, model: {model}, base_url: '{url}', "
        f"api_key: {UPSTREAM_KEY}}}]}}"
        for name, (provider, model, url) in deployments.items()
    )
    return f"""\
listen: 127.0.0.1:{port}
state: {state}
logging: {{access: false}}
admin: {{token: {ADMIN_TOKEN}}}
auth: {{required: true}}
roles:
  caller: {{models: ["bench-*"]{f", budgets: {BUDGET}" if budget else ""}}}
services: {{}}
models:
{models}
"""


def litellm_config(up_port: int) -> str:
    return f"""\
model_list:
  - model_name: bench-openai
    litellm_params:
      model: openai/gpt-bench
      api_base: http://127.0.0.1:{up_port}/v1
      api_key: {UPSTREAM_KEY}
general_settings:
  master_key: {LITELLM_MASTER_KEY}
litellm_settings:
  telemetry: false
  set_verbose: false
"""


def start_litellm(procs: Procs, work: Path, python: str, port: int, up_port: int) -> int:
    cfg = work / "litellm.yaml"
    cfg.write_text(litellm_config(up_port))
    env = dict(
        os.environ,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the price list at start-up
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        DISABLE_SCHEMA_UPDATE="True",
    )
    env.pop("DATABASE_URL", None)  # no database: keys are the master key only
    env.pop("PYTHONPATH", None)  # its own virtualenv, nothing of ours
    cli = Path(python).parent / "litellm"
    argv = [str(cli)] if cli.exists() else [python, "-m", "litellm.proxy.proxy_cli"]
    argv += ["--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    argv += ["--telemetry", "False"]  # a no-op in recent versions, off in older ones
    log(f"starting litellm: {' '.join(argv)} (log: {work / 'litellm.log'})")
    proc = procs.spawn(argv, cpu=CPU_PROXY, log_path=work / "litellm.log", env=env)
    wait_http(port, "/health/liveliness", proc, timeout=120)
    return proc.pid


def start_floor(procs: Procs, work: Path, port: int, up_port: int) -> int:
    """bench/llm_floor_app.py on bridgeway.serving (1 worker, pinned), the server `bridgeway serve` runs on."""
    env = dict(
        os.environ,
        BENCH_UPSTREAM_PORT=str(up_port),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), str(ROOT / "src")]),
    )
    argv = [sys.executable, "-m", "bridgeway.serving", "llm_floor_app:app", "--workers", "1"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    log(f"starting floor: {' '.join(argv)} (log: {work / 'floor.log'})")
    proc = procs.spawn(argv, cpu=CPU_PROXY, log_path=work / "floor.log", env=env)
    wait_http(port, "/v1/chat/completions", proc)
    return proc.pid


def litellm_problem(python: str) -> str | None:
    """Why the LiteLLM row cannot run, or None."""
    if not Path(python).exists():
        return (
            f"no Python at {python}; make LiteLLM's own virtualenv with\n"
            f"  python3 -m venv /tmp/venv-litellm && /tmp/venv-litellm/bin/pip install 'litellm[proxy]'\n"
            f"or pass --litellm-python PATH"
        )
    import subprocess

    found = subprocess.run(
        [python, "-c", "import litellm.proxy.proxy_server"], capture_output=True, text=True, timeout=120
    )
    if found.returncode:
        return (
            f"{python} cannot import litellm's proxy (pip install 'litellm[proxy]' there): "
            + (found.stderr.strip().splitlines() or ["?"])[-1]
        )
    return None


def new_key(port: int) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/keys",
        data=json.dumps({"name": "bench", "role": "caller"}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())["key"]


def wrk_script(path: Path, model: str, key: str | None) -> Path:
    """A wrk Lua script POSTing the bench request for `model`."""
    body = json.dumps({**REQUEST, "model": model}, separators=(",", ":"))
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(body)}",  # a JSON string literal is a valid Lua string literal here
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if key:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def check_answer(url: str, model: str, key: str | None) -> None:
    """One request before measuring: a 200 with an OpenAI chat.completion, else stop with why."""
    body = json.dumps({**REQUEST, "model": model}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered {exc.code}: {exc.read()[:500]!r}") from None
    content = answer["choices"][0]["message"]["content"]
    if "benchmark" not in content:
        raise RuntimeError(f"{url} answered an unexpected completion: {answer}")


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    thr: WrkResult  # at --connections
    lat: WrkResult  # at LATENCY_CONNECTIONS
    one: WrkResult  # at 1 connection
    cpu: float  # cores the server used during the throughput run
    core_other: float  # share of the server's core taken by anything else meanwhile

    @property
    def cpu_us(self) -> float:
        """Server CPU per request (µs), steadier than req/s when the host takes the core."""
        return self.cpu / self.thr.rps * 1e6 if self.thr.rps else 0.0


@dataclass(frozen=True)
class Target:
    url: str
    script: Path
    pid: int  # the server wrk talks to (its process tree's CPU is measured)
    warmup: float
    log_name: str  # its log in the work directory, shown when it answers badly


def one_duration(duration: float) -> int:
    """The c=1 run's seconds: half the others', whole (wrk takes whole seconds)."""
    return max(1, int(duration // 2))


def measure(t: Target, connections: int, duration: float) -> Measurement:
    run_wrk(t.url, connections=connections, duration=t.warmup, script=t.script)
    cpu0, (idle0, total0) = tree_cpu_seconds(t.pid), core_jiffies(CPU_PROXY)
    thr = run_wrk(t.url, connections=connections, duration=duration, script=t.script)
    cpu = (tree_cpu_seconds(t.pid) - cpu0) / duration
    idle1, total1 = core_jiffies(CPU_PROXY)
    core_idle = (idle1 - idle0) / max(total1 - total0, 1)
    lat = run_wrk(t.url, connections=LATENCY_CONNECTIONS, duration=duration, script=t.script)
    one = run_wrk(t.url, connections=1, duration=one_duration(duration), script=t.script)
    return Measurement(thr, lat, one, cpu, max(0.0, 1.0 - core_idle - cpu))


def summarize(ms: list[Measurement], on_server_core: bool) -> tuple[Measurement, int]:
    """Medians over the clean rounds (all when none is clean); errors summed over all rounds."""
    clean = [m for m in ms if m.core_other < MAX_OTHER_WORK] if on_server_core else []
    used = clean or ms
    med = statistics.median

    def merged(runs: list[WrkResult], every: list[WrkResult]) -> WrkResult:
        return WrkResult(
            rps=med(r.rps for r in runs),
            p50_ms=med(r.p50_ms for r in runs),
            p99_ms=med(r.p99_ms for r in runs),
            requests=sum(r.requests for r in every),
            non_2xx=sum(r.non_2xx for r in every),
            socket_errors=sum(r.socket_errors for r in every),
        )

    return (
        Measurement(
            merged([m.thr for m in used], [m.thr for m in ms]),
            merged([m.lat for m in used], [m.lat for m in ms]),
            merged([m.one for m in used], [m.one for m in ms]),
            med(m.cpu for m in used),
            med(m.core_other for m in used),
        ),
        len(used),
    )


def latency_ms(r: WrkResult, value: float, digits: int = 2) -> str:
    """A latency, or a dash when the run got no answer at all (wrk then reports 0)."""
    return f"{value:.{digits}f} ms" if r.requests else "no answer"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def table_rows(results: dict[str, Measurement], used: dict[str, int], rounds: int) -> list[list[str]]:
    direct, litellm, passthrough = results.get("direct"), results.get("litellm"), results.get("openai")
    rows = []
    for name, m in results.items():
        bridgeway = name in BRIDGEWAY_ROWS or name == BUDGET_ROW
        added = added_one = vs_litellm = translation = "-"
        if direct is not None and name != "direct" and m.lat.requests and m.one.requests:
            a50, a99 = m.lat.p50_ms - direct.lat.p50_ms, m.lat.p99_ms - direct.lat.p99_ms
            added = f"{a50:+.2f} / {a99:+.2f} ms"
            if bridgeway:
                added += f" ({verdict(a50 <= MAX_ADDED_P50_MS and a99 <= MAX_ADDED_P99_MS)})"
            added_one = f"{m.one.p50_ms - direct.one.p50_ms:+.3f} ms"
        if litellm is not None and name != "direct":
            ratio = m.thr.rps / litellm.thr.rps
            vs_litellm = f"{ratio:,.1f}x"
            if bridgeway:
                vs_litellm += f" ({verdict(ratio >= MIN_VS_LITELLM)})"
        if passthrough is not None and name in ("openai>anthropic", "openai>gemini") and passthrough.cpu_us:
            ratio = m.cpu_us / passthrough.cpu_us
            translation = f"{ratio:.2f}x ({verdict(ratio <= MAX_TRANSLATION)})"
        elif passthrough is not None and name == BUDGET_ROW and passthrough.cpu_us:
            translation = f"{m.cpu_us / passthrough.cpu_us:.2f}x"  # what the budget costs (no target)
        rows.append(
            [
                name,
                f"{m.thr.rps:,.0f}",
                f"{m.cpu * 100:.0f}%",
                f"{m.cpu_us:,.0f} µs" if name != "direct" else "-",
                latency_ms(m.lat, m.lat.p50_ms),
                latency_ms(m.lat, m.lat.p99_ms),
                added,
                added_one,
                vs_litellm,
                translation,
                str(m.thr.errors + m.lat.errors + m.one.errors),
                f"{used[name]}/{rounds}",
            ]
        )
    return rows


HEADERS = [
    "row",
    "requests/s",
    "server CPU",
    "CPU/request",
    "p50 (c=8)",
    "p99 (c=8)",
    "added p50 / p99 (c=8)",
    "added p50 (c=1)",
    "req/s vs LiteLLM",
    "CPU/request vs pass-through",
    "errors",
    "rounds used",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measurement (c=1 gets half)")
    p.add_argument("--connections", type=int, default=64, help="connections of the throughput run")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the table shows medians")
    p.add_argument("--only", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    p.add_argument("--litellm-python", default=DEFAULT_LITELLM_PYTHON, help="python of LiteLLM's own venv")
    p.add_argument(
        "--budget",
        action="store_true",
        help="give the key's role a budget (needs a Bridgeway with budgets); state then defaults to SQLite",
    )
    p.add_argument(
        "--state",
        help="Bridgeway's state backend (default memory://, or sqlite in the work dir with --budget), "
        "e.g. redis://127.0.0.1:6379/15",
    )
    p.add_argument("--bridgeway-cmd", default=DEFAULT_BRIDGEWAY_CMD)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    if bad := set(args.only) - set(ROWS):
        p.error(f"unknown rows: {', '.join(sorted(bad))}")
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        p.error("needs wrk and nginx on PATH: apt-get install -y wrk nginx")
    return args


def main() -> int:
    args = parse_args()
    rows = list(args.only)
    if "litellm" in rows and (problem := litellm_problem(args.litellm_python)):
        log(f"the litellm row is left out: {problem}")
        rows.remove("litellm")
    if not rows:
        log("no row left to measure")
        return 1
    with (
        sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="bridgeway-bench-llm-") as tmp,
        Procs() as procs,
    ):
        work = Path(tmp)
        up_port = free_port()
        fake = start_nginx(procs, work, "fake-provider", fake_provider_server(up_port), cpu=CPU_LOAD)
        wait_http(up_port, "/v1/chat/completions", fake)
        targets: dict[str, Target] = {}
        if "direct" in rows:
            url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
            targets["direct"] = Target(
                url,
                wrk_script(work / "direct.lua", "gpt-bench", None),
                fake.pid,
                WARMUP_S,
                "fake-provider/nginx.log",
            )
        if "litellm" in rows:
            port = free_port()
            try:
                pid = start_litellm(procs, work, args.litellm_python, port, up_port)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                script = wrk_script(work / "litellm.lua", "bench-openai", LITELLM_MASTER_KEY)
                check_answer(url, "bench-openai", LITELLM_MASTER_KEY)
                targets["litellm"] = Target(url, script, pid, LITELLM_WARMUP_S, "litellm.log")
            except (RuntimeError, TimeoutError, OSError) as exc:
                log(f"litellm did not start or answer: {exc}\n{tail(work / 'litellm.log')}")
        if "floor" in rows:
            port = free_port()
            proc = start_floor(procs, work, port, up_port)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            script = wrk_script(work / "floor.lua", "gpt-bench", None)
            targets["floor"] = Target(url, script, proc, WARMUP_S, "floor.log")
        if any(r in BRIDGEWAY_ROWS for r in rows):
            port = free_port()
            state = args.state or (f"sqlite:///{work / 'bridgeway.db'}" if args.budget else "memory://")
            config = bridgeway_config(port, up_port, state, args.budget)
            try:
                proc = start_bridgeway(procs, work, port, up_port, args.bridgeway_cmd, config)
            except (RuntimeError, TimeoutError) as exc:
                log(f"bridgeway did not start: {exc}\n{tail(work / 'bridgeway.log')}")
                return 1
            key = new_key(port)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for row, model in BRIDGEWAY_ROWS.items():
                if row in rows:
                    script = wrk_script(work / f"{model}.lua", model, key)
                    check_answer(url, model, key)
                    targets[row] = Target(url, script, proc.pid, WARMUP_S, "bridgeway.log")

        if BUDGET_ROW in rows:
            port = free_port()
            state = args.state or f"sqlite:///{work / 'budget.db'}"
            config = bridgeway_config(port, up_port, state, budget=True)
            try:
                proc = start_bridgeway(procs, work, port, up_port, args.bridgeway_cmd, config, name="budget")
            except (RuntimeError, TimeoutError) as exc:
                log(f"bridgeway with a budget did not start: {exc}\n{tail(work / 'budget.log')}")
                return 1
            key = new_key(port)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            script = wrk_script(work / "budget.lua", "bench-openai", key)
            check_answer(url, "bench-openai", key)
            targets[BUDGET_ROW] = Target(url, script, proc.pid, WARMUP_S, "budget.log")

        started = time.monotonic()
        runs: dict[str, list[Measurement]] = {name: [] for name in targets}
        for rnd in range(args.rounds):  # interleaved, so drift on a noisy host hits every row alike
            for name, t in targets.items():
                log(f"round {rnd + 1}/{args.rounds}: {name}")
                m = measure(t, args.connections, args.duration)
                log(
                    f"  {m.thr.rps:,.0f} req/s at c={args.connections} (server CPU {m.cpu:.0%}, "
                    f"other work {m.core_other:.0%}); c={LATENCY_CONNECTIONS}: p50 {m.lat.p50_ms:.2f} ms "
                    f"p99 {m.lat.p99_ms:.2f} ms; c=1: p50 {m.one.p50_ms:.3f} ms; "
                    f"errors {m.thr.errors + m.lat.errors + m.one.errors}"
                )
                runs[name].append(m)
                if m.thr.errors + m.lat.errors + m.one.errors or not (m.lat.requests and m.one.requests):
                    log(f"  {name} answered badly; the end of its log:\n{tail(work / t.log_name)}")
        log(f"measured in {time.monotonic() - started:.0f} s")
        summaries = {name: summarize(done, on_server_core=name != "direct") for name, done in runs.items()}

    results = {name: s for name, (s, _) in summaries.items()}
    used = {name: n for name, (_, n) in summaries.items()}
    title = (
        f"POST /v1/chat/completions, wrk -t1: requests/s at c={args.connections}, latency at "
        f"c={LATENCY_CONNECTIONS} ({args.duration:g} s each) and c=1 ({one_duration(args.duration)} s), {args.rounds} round(s) (medians of rounds "
        f"where other work took < {MAX_OTHER_WORK:.0%} of core {CPU_PROXY}); server on core {CPU_PROXY}, "
        f"wrk + fake provider (nginx) on core {CPU_LOAD}"
        + (f"; Bridgeway with a budget on the key's role ({BUDGET})" if args.budget else "")
        + (f", state {args.state}" if args.state else "")
    )
    print_table(title, HEADERS, table_rows(results, used, args.rounds), args.markdown)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; all started processes were stopped")
        sys.exit(130)
