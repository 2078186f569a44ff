"""The benchmark: every scenario of issue 12, side by side against plain mitmproxy (+tls) and the registry directly,
in one run; a table per scenario on stdout, the figures in bench/results/<date>.json and a chart per scenario.

    ./run.sh bench [--quick] [--scenarios blob,manifest,...]      (as root: in a private network namespace)

Scenarios (bench/README.md says what each measures and how):

- blob:        one blob GET, one stream, HTTP/1.1 and HTTP/2 clients (bench/pull.py's four ways), and the CPU a GiB of
               the client and of the proxy;
- manifest:    manifest by tag from a token-auth registry, the token cached (by the client, or by ocigate): p50/p95;
- rss:         the proxies' peak RSS (VmHWM) after streaming one blob of each size, fresh processes per size;
- concurrency: 1, 10, 50, 200 concurrent pulls of a 10-layer image: MiB/s, manifest p50/p99, summed RSS, CPU;
- tokens:      50 concurrent pulls from a token-auth registry: requests counted at the token server;
- failover:    a refusing or blackholed first mirror: added ms on the first request and on the next 100.

Everything runs on loopback: one plain registry and one token-auth registry (Debian's docker-registry), the tests'
token server, mitmdumps and gateways (tests/support). Every process started is stopped at the end, on errors and on
Ctrl-C/SIGTERM; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import pull
from bench.charts import draw_all
from bench.load import Outcome, Spec, parse_outcome
from bench.procs import cpu_seconds, process_tree, summed_memory_mib
from bench.results import Chart, Results, Scenario, save, this_machine
from bench.stats import (
    alternating,
    median,
    median_of_differences,
    median_of_ratios,
    mib_per_second,
    percentile,
    ratio,
)
from bench.tables import Cell, format_table
from ocigate.credentials import Credential, OcigateStore
from ocigate.metrics import Reason
from tests.support.gateway import Gateway, running_gateway
from tests.support.images import OCI_MANIFEST, Blob, Image, make_image, push_image
from tests.support.processes import NotReady
from tests.support.registry import Registry, free_port, running_registry
from tests.support.token_server import TokenServer, running_token_server

SCENARIOS = ("blob", "manifest", "rss", "concurrency", "tokens", "failover")
RESULTS_DIRECTORY = Path(__file__).with_name("results")

AUTH_UPSTREAM = "auth.test"
AUTH_MIRROR = "authmirror.test:5000"
FIRST_MIRROR = "first.test:5000"  # the failover scenario's first host: refusing or blackholed
SMALL_REPOSITORY = "bench/small"
SMALL_TAG = "v1"
ACCOUNT, PASSWORD = "bench", "bench-password"  # the token server's one account; a throwaway on loopback
TOKEN_LIFETIME = 3600.0  # longer than a run: the token count is per lifetime
LOAD_SECONDS = 300.0  # one load run (one way, one concurrency, one round) stops after this
REQUEST_TIMEOUT = httpx.Timeout(30.0)
FAILOVER_NEXT = 100
FAILOVER_WARMUP = 3
WARM_UPSTREAM = "warm.test"
HEALTHY = "ocigate healthy"
# The blob scenario's clients: what the table calls it, whether it offers HTTP/2. (httpx opens a window of 16 MiB on
# the connection and on each stream, HTTP/2's flow control no bound here: the HTTP/2 rows measure its framing.)
BLOB_CLIENTS: list[tuple[str, bool]] = [("HTTP/1.1", False), ("HTTP/2 offered", True)]
TOKEN_PULLS = 50

# The ways, in the order the tables list them.
DIRECT, MITMPROXY, MITMPROXY_TLS, OCIGATE = "direct", "mitmproxy", "mitmproxy+tls", "ocigate"
OCIGATE_BASELINE = "ocigate baseline"  # the manifest scenario's --baseline-addons


class BenchError(Exception):
    """The run cannot go on: a wrong answer, a process that did not start."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Way:
    """One way of getting content: `pull.Leg` (what its client asks, through which proxy) plus the proxy's CA file
    for the load process and a bearer token the client sends itself (a client that has cached its token)."""

    leg: pull.Leg
    ca_path: Path | None = None
    token: str | None = None

    @property
    def name(self) -> str:
        return self.leg.name

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def processes(self) -> list[int]:
        """The proxy's processes (a gateway's workers too) as they are now; none for a way without a proxy."""
        return process_tree(self.leg.pid) if self.leg.pid is not None else []


@dataclass
class World:
    """What every scenario shares: the registries, their content, the token server, and what a scenario needs to
    start proxies of its own."""

    workdir: Path
    registry: Registry  # plain
    content: pull.Content  # the big blob in registry
    small: Image  # in both registries, SMALL_REPOSITORY:SMALL_TAG
    tokens: TokenServer
    auth_registry: Registry
    started: int = 0  # proxies started so far, for unique directories

    def directory(self, name: str) -> Path:
        self.started += 1
        return self.workdir / f"{self.started:02d}-{name}"

    def repointing(self, target: Registry, stack: contextlib.ExitStack) -> Gateway:
        return stack.enter_context(
            pull.running_mitmdump(
                self.directory("mitmproxy-tls"),
                scripts=[pull.REPOINT_ADDON],
                options=[f"bench_repoint_to=127.0.0.1:{target.port}"],
            )
        )

    def gateway(
        self,
        stack: contextlib.ExitStack,
        *,
        rules: Path | None = None,
        host_map: dict[str, str] | None = None,
        options: Sequence[str] = (),
        workers: int = 1,
        addons: Path | None = None,
    ) -> Gateway:
        """A gateway for upstream.test (the plain registry) and auth.test (the token-auth one, with ocigate's own
        credential), or for `rules`. `workers` > 1 starts `ocigate --workers N`; BenchError("unsupported") when the
        ocigate on the path does not know that flag. `addons`: another ocigate's `addons/` directory (an earlier
        commit's, checked out elsewhere) to run instead of this one."""
        directory = self.directory(f"ocigate-{workers}w")
        if rules is None:
            rules = self.rules()
        hosts = {pull.MIRROR: f"127.0.0.1:{self.registry.port}", AUTH_MIRROR: f"127.0.0.1:{self.auth_registry.port}"}
        directory.mkdir(parents=True)
        OcigateStore(directory / "ocigate-credentials.json").save(AUTH_MIRROR, Credential(ACCOUNT, PASSWORD))
        entry_point: tuple[str, ...] = (sys.executable, "-m", "ocigate.cli")
        if workers > 1:
            entry_point += ("--workers", str(workers))
        try:
            env = {"PYTHONPATH": str(addons.resolve())} if addons is not None else {}
            return stack.enter_context(
                running_gateway(directory, rules, {**hosts, **(host_map or {})}, options, entry_point, env=env)
            )
        except NotReady as e:
            if workers > 1 and "unrecognized arguments" in str(e):
                raise WorkersUnsupported(f"ocigate does not know --workers yet ({workers} asked)") from e
            raise

    def rules(self) -> Path:
        directory = self.directory("rules")
        pull.write_rules(directory)
        (directory / AUTH_UPSTREAM).mkdir()
        (directory / AUTH_UPSTREAM / "hosts.toml").write_text(
            f'server = "https://{AUTH_UPSTREAM}"\n\n[host."http://{AUTH_MIRROR}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        return directory

    def bearer(self) -> str:
        """A token for the small repository, as a client holds one it fetched earlier (minted, not requested: the
        token server counts only what the ways ask it)."""
        access = [{"type": "repository", "name": SMALL_REPOSITORY, "actions": ["pull"]}]
        return self.tokens.mint(ACCOUNT, access)


class WorkersUnsupported(BenchError):
    pass


# --- ways ----------------------------------------------------------------------------------------------------------


def direct_way(registry: Registry, token: str | None = None) -> Way:
    return Way(pull.Leg(DIRECT, registry.url, None, True, None), None, token)


def proxy_way(name: str, proxy: Gateway, upstream: str = pull.UPSTREAM, token: str | None = None) -> Way:
    leg = pull.Leg(name, f"https://{upstream}", proxy.proxy_url, pull.trusting(proxy.ca_path), proxy.process.pid)
    return Way(leg, proxy.ca_path, token)


def plain_way(proxy: Gateway, registry: Registry) -> Way:
    return Way(pull.Leg(MITMPROXY, registry.url, proxy.proxy_url, True, proxy.process.pid))


def client(way: Way, http2: bool = False) -> httpx.Client:
    return httpx.Client(
        proxy=way.leg.proxy,
        verify=way.leg.verify,
        http1=True,
        http2=http2,
        trust_env=False,
        timeout=REQUEST_TIMEOUT,
        follow_redirects=False,
    )


def manifest_get(session: httpx.Client, way: Way, repository: str, tag: str, digest: str) -> float:
    """Milliseconds of one manifest GET by tag on `session`; a wrong answer stops the run."""
    headers = {"Accept": OCI_MANIFEST, **way.headers()}
    started = time.perf_counter()
    response = session.get(f"{way.leg.base_url}/v2/{repository}/manifests/{tag}", headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise BenchError(f"{way.name}: manifest GET answered {response.status_code}: {response.text[:300]}")
    if "sha256:" + hashlib.sha256(response.content).hexdigest() != digest:
        raise BenchError(f"{way.name}: wrong manifest body: {response.content[:200]!r}")
    return elapsed


def manifest_batch(
    session: httpx.Client, way: Way, count: int, repository: str, tag: str, digest: str, deadline: float
) -> list[float]:
    """`count` sequential manifest GETs on `session` (fewer when `deadline`, a time.monotonic(), passes)."""
    timings: list[float] = []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        timings.append(manifest_get(session, way, repository, tag, digest))
    if not timings:
        raise BenchError(f"{way.name}: no manifest GET finished within {pull.MANIFEST_LEG_SECONDS:.0f} s")
    return timings


def load(world: World, way: Way, pulls: int, concurrency: int, *, token_per_pull: bool = False) -> Outcome:
    """One run of the concurrent puller (bench/load.py) in a process of its own."""
    spec = Spec(
        base_url=way.leg.base_url,
        proxy=way.leg.proxy,
        ca_path=str(way.ca_path) if way.ca_path else None,
        repository=SMALL_REPOSITORY,
        tag=SMALL_TAG,
        manifest_digest=world.small.manifest.digest,
        pulls=pulls,
        concurrency=concurrency,
        time_limit=LOAD_SECONDS,
        username=ACCOUNT,
        password=PASSWORD,
        token_per_pull=token_per_pull,
    )
    spec_path = world.workdir / "load-spec.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "bench.load", str(spec_path)],
            capture_output=True,
            timeout=LOAD_SECONDS + 60,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
    except subprocess.TimeoutExpired as e:  # run() has killed it
        raise BenchError(f"{way.name}: the load process did not end within {LOAD_SECONDS + 60:.0f} s") from e
    if finished.returncode != 0:
        raise BenchError(f"{way.name}: the load process failed: {finished.stderr.decode(errors='replace')[-2000:]}")
    outcome = parse_outcome(finished.stdout.decode())
    if outcome.error_count:
        raise BenchError(f"{way.name}: {outcome.error_count} pulls failed, e.g. {outcome.errors}")
    return outcome


def show(scenario: Scenario) -> Scenario:
    print(f"\n== {scenario.title}\n")
    print(format_table(scenario.columns, scenario.rows))
    for note in scenario.notes:
        print(f"  - {note}")
    sys.stdout.flush()
    return scenario


def versus(value: float | None, baselines: dict[str, float | None]) -> list[Cell]:
    """The ratio columns every table ends with: value over mitmproxy+tls's, over direct's."""
    return [ratio(value, baselines.get(MITMPROXY_TLS)), ratio(value, baselines.get(DIRECT))]


# --- 1. blob throughput ---------------------------------------------------------------------------------------------


def blob_scenario(world: World, args: argparse.Namespace) -> Scenario:
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(pull.running_mitmdump(world.directory("mitmproxy")))
        ways = [
            direct_way(world.registry),
            plain_way(plain, world.registry),
            proxy_way(MITMPROXY_TLS, world.repointing(world.registry, stack)),
            proxy_way(OCIGATE, world.gateway(stack)),
        ]
        rows: list[list[Cell]] = []
        series: dict[str, list[float | None]] = {way.name: [] for way in ways}
        gib = world.content.blob_size * args.rounds / (1024 * pull.MIB)
        for kind, http2 in BLOB_CLIENTS:
            seconds: dict[str, list[float]] = {way.name: [] for way in ways}
            spoken: dict[str, str] = {}
            client_cpu = dict.fromkeys(seconds, 0.0)  # CPU seconds of the client's thread, over the rounds
            proxy_cpu = dict.fromkeys(seconds, 0.0)  # CPU seconds of the proxy's processes
            for number in range(1, args.rounds + 1):  # rounds interleave the ways: drift hits all alike
                for way in ways:
                    proxy = way.processes()
                    # httpx (sync) and its sha256 run on this thread: the token server's thread is not counted.
                    client_before, proxy_before = time.thread_time(), cpu_seconds(proxy)
                    elapsed, spoken[way.name] = pull.get_blob(way.leg, world.content, http2)
                    client_cpu[way.name] += time.thread_time() - client_before
                    proxy_cpu[way.name] += cpu_seconds(proxy) - proxy_before
                    seconds[way.name].append(elapsed)
                    say(f"blob {kind} round {number}/{args.rounds} {way.name:<14} {elapsed:6.2f} s")
            speeds = {name: mib_per_second(world.content.blob_size, median(values)) for name, values in seconds.items()}
            for way in ways:
                rounds = " ".join(f"{value:.2f}" for value in seconds[way.name])
                row: list[Cell] = [way.name, kind, spoken[way.name]]
                # Throughput ratio = time ratio inverted: baseline's seconds over this way's, round by round.
                against = [median_of_ratios(seconds[name], seconds[way.name]) for name in (MITMPROXY_TLS, DIRECT)]
                cpu: list[Cell] = [client_cpu[way.name] / gib, proxy_cpu[way.name] / gib if way.leg.pid else None]
                rows.append([*row, speeds[way.name], rounds, *against, *cpu])
                series[way.name].append(speeds[way.name])
    return Scenario(
        name="blob",
        title=f"1. Blob throughput, one stream, {world.content.blob_size // pull.MIB} MiB blob, "
        f"median of {args.rounds} rounds",
        columns=[
            "way",
            "client",
            "spoken",
            "MiB/s",
            "rounds s",
            "/mitmproxy+tls",
            "/direct",
            "client CPU s/GiB",
            "proxy CPU s/GiB",
        ],
        rows=rows,
        chart=Chart(
            "bar", "Blob throughput, one stream", "client", "MiB/s", [kind for kind, _ in BLOB_CLIENTS], series
        ),
        notes=[
            "ocigate hashes the blob as it streams and probes the host with a HEAD first",
            "the http:// ways (direct, mitmproxy) stay on HTTP/1.1 when HTTP/2 is offered (no h2c in httpx)",
            "direct is bounded by the client itself (httpx and sha256 on the same cores)",
            "CPU s/GiB: the CPU time (user and system) of the client (httpx and its sha256, on the measuring thread; a "
            "new connection a GET, its TLS handshake included) and of the proxy's processes (from /proc) during each "
            "way's GETs, over the GiB they moved; the machine's cores are shared by client, proxy and registry",
            "MiB/s: from the median time of the rounds; ratios: per round (the ways interleave), the median of them",
        ],
    )


# --- 2. manifest by tag, token cached -------------------------------------------------------------------------------


def manifest_scenario(world: World, args: argparse.Namespace) -> Scenario:
    token = world.bearer()
    digest = world.small.manifest.digest
    with contextlib.ExitStack() as stack:
        ways = [
            direct_way(world.auth_registry, token),
            proxy_way(MITMPROXY_TLS, world.repointing(world.auth_registry, stack), AUTH_UPSTREAM, token),
            proxy_way(OCIGATE, world.gateway(stack), AUTH_UPSTREAM),
        ]
        if args.baseline_addons is not None:
            baseline = world.gateway(stack, addons=args.baseline_addons)
            ways.append(proxy_way(OCIGATE_BASELINE, baseline, AUTH_UPSTREAM))
        # One keep-alive connection per way for the whole scenario; its unmeasured first GETs open it and, through
        # ocigate, fill the token cache.
        sessions = {way.name: stack.enter_context(client(way)) for way in ways}
        for way in ways:
            warmup_deadline = time.monotonic() + pull.MANIFEST_LEG_SECONDS
            manifest_batch(
                sessions[way.name], way, pull.MANIFEST_WARMUP, SMALL_REPOSITORY, SMALL_TAG, digest, warmup_deadline
            )
        # Rounds interleave the ways (a batch each, the order reversed every other round), so that the figures of
        # one round are measured side by side, under the same state of the machine.
        batches: dict[str, list[list[float]]] = {way.name: [] for way in ways}
        # The proxy's CPU seconds during its own batches (its processes, from /proc), over the GETs of them.
        cpu: dict[str, float] = {way.name: 0.0 for way in ways}
        # The scenario's time limit is checked between rounds only: a round cut in the middle would leave ways
        # without a batch to pair with the others'. Each batch has a limit of its own.
        deadline = time.monotonic() + pull.MANIFEST_LEG_SECONDS * len(ways)
        for number in range(args.manifest_rounds):
            for way in alternating(ways, number):
                batch_deadline = time.monotonic() + pull.MANIFEST_LEG_SECONDS
                processes = way.processes()
                cpu_before = cpu_seconds(processes)
                batch = manifest_batch(
                    sessions[way.name], way, args.requests, SMALL_REPOSITORY, SMALL_TAG, digest, batch_deadline
                )
                cpu[way.name] += cpu_seconds(processes) - cpu_before
                batches[way.name].append(batch)
                say(
                    f"manifests round {number + 1}/{args.manifest_rounds} {way.name:<14} "
                    f"p50 {percentile(batch, 0.5):.2f} ms"
                )
            if time.monotonic() > deadline:
                say(f"manifests: stopped after {number + 1} rounds ({pull.MANIFEST_LEG_SECONDS * len(ways):.0f} s)")
                break
    every = {name: [value for batch in rounds for value in batch] for name, rounds in batches.items()}
    p50 = {name: percentile(values, 0.5) for name, values in every.items()}
    p95 = {name: percentile(values, 0.95) for name, values in every.items()}
    round_p50 = {name: [percentile(batch, 0.5) for batch in rounds] for name, rounds in batches.items()}
    round_p95 = {name: [percentile(batch, 0.95) for batch in rounds] for name, rounds in batches.items()}
    cpu_ms = {name: cpu[name] * 1000 / len(values) for name, values in every.items()}
    rows: list[list[Cell]] = []
    for way in ways:
        measured = way.name != DIRECT
        rows.append(
            [
                way.name,
                p50[way.name],
                p95[way.name],
                median_of_differences(round_p50[way.name], round_p50[MITMPROXY_TLS]) if measured else None,
                median_of_differences(round_p95[way.name], round_p95[MITMPROXY_TLS]) if measured else None,
                median_of_ratios(round_p50[way.name], round_p50[MITMPROXY_TLS]),
                median_of_ratios(round_p50[way.name], round_p50[DIRECT]),
                cpu_ms[way.name] if measured else None,
                cpu_ms[way.name] / cpu_ms[MITMPROXY_TLS] if measured and cpu_ms[MITMPROXY_TLS] else None,
            ]
        )
    added = " ".join(
        f"{value:+.2f}" for value in (a - b for a, b in zip(round_p50[OCIGATE], round_p50[MITMPROXY_TLS], strict=True))
    )
    rounds_done = len(batches[OCIGATE])
    return Scenario(
        name="manifest",
        title=f"2. Manifest by tag, token cached, {rounds_done} interleaved rounds of {args.requests} sequential GETs "
        "per way, one connection per way (ms)",
        columns=[
            "way",
            "p50 ms",
            "p95 ms",
            "p50 added",
            "p95 added",
            "p50 /mitmproxy+tls",
            "/direct",
            "proxy CPU ms/GET",
            "CPU /mitmproxy+tls",
        ],
        rows=rows,
        chart=Chart(
            "bar",
            "Manifest by tag, token cached",
            "percentile",
            "ms",
            ["p50", "p95"],
            {way.name: [p50[way.name], p95[way.name]] for way in ways},
        ),
        notes=[
            "token-auth registry: direct and mitmproxy+tls send a token the client holds; through ocigate the client "
            "sends none and ocigate uses the token it cached (the first GETs, unmeasured, fetched it)",
            f"rounds interleave the ways (a batch of {args.requests} GETs each, the order reversed every other round); "
            "p50 and p95: all rounds together; added and ratios: per round against the same round's mitmproxy+tls "
            "(or direct), the median over rounds",
            f"ocigate's p50 added per round: {added} ms",
            "proxy CPU ms/GET: the proxy's CPU time (user and system, all its processes, from /proc) during its own "
            "batches, over their GETs, and its ratio: of the totals over all rounds; on a machine where client, "
            "registry and proxy share the cores, each ms of it is latency",
            *(
                [f"{OCIGATE_BASELINE}: ocigate {addons_label(args.baseline_addons)} (--baseline-addons), alike"]
                if args.baseline_addons is not None
                else []
            ),
            "targets (issue 12): added p50 <= 1.0 ms, p95 <= 2 ms over mitmproxy+tls",
        ],
    )


# --- 3. peak RSS vs blob size ---------------------------------------------------------------------------------------


def push_streamed_blob(registry: Registry, size: int) -> pull.Content:
    """A blob of `size` bytes pushed without holding it in memory: a random 4 MiB block repeated (no proxy here
    compresses or deduplicates, so repeating costs nothing in realism), streamed in a PATCH and closed with a PUT."""
    block = os.urandom(4 * pull.MIB)

    def pieces() -> Iterator[bytes]:
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            left -= len(piece)
            yield piece

    hasher = hashlib.sha256()
    for piece in pieces():
        hasher.update(piece)
    digest = "sha256:" + hasher.hexdigest()
    base = f"{registry.url}/v2/{pull.REPOSITORY}/blobs/uploads/"
    with httpx.Client(timeout=httpx.Timeout(600.0), trust_env=False) as session:
        started = session.post(base)
        if started.status_code != 202:
            raise BenchError(f"push of a {size} byte blob: POST answered {started.status_code}")
        location = httpx.URL(registry.url).join(started.headers["Location"])
        patched = session.patch(location, content=pieces(), headers={"Content-Type": "application/octet-stream"})
        if patched.status_code != 202:
            raise BenchError(f"push of a {size} byte blob: PATCH answered {patched.status_code}: {patched.text[:300]}")
        location = httpx.URL(registry.url).join(patched.headers["Location"])
        finished = session.put(location.copy_merge_params({"digest": digest}))
        if finished.status_code != 201:
            raise BenchError(f"push of a {size} byte blob: PUT answered {finished.status_code}: {finished.text[:300]}")
    # pull.get_blob reads only a Content's blob digest and size; no manifest names this blob.
    return pull.Content(digest, size, Blob.of(OCI_MANIFEST, b"{}"))


def rss_scenario(world: World, args: argparse.Namespace) -> Scenario:
    rows: list[list[Cell]] = []
    series: dict[str, list[float | None]] = {MITMPROXY_TLS: [], OCIGATE: []}
    labels: list[str | float] = []
    for size_mib in args.rss_mib:
        say(f"rss: pushing a {size_mib} MiB blob")
        content = push_streamed_blob(world.registry, size_mib * pull.MIB)
        labels.append(f"{size_mib} MiB")
        with contextlib.ExitStack() as stack:  # fresh proxies per size: VmHWM only grows
            ways = [
                proxy_way(MITMPROXY_TLS, world.repointing(world.registry, stack)),
                proxy_way(OCIGATE, world.gateway(stack)),
            ]
            idle: dict[str, float] = {}
            peaks: dict[str, float | None] = {}
            for way in ways:
                pid = way.leg.pid
                if pid is None:
                    raise BenchError(f"{way.name}: no proxy process to measure")
                idle[way.name] = summed_memory_mib(process_tree(pid), "VmRSS")
                elapsed, _ = pull.get_blob(way.leg, content, False)
                peaks[way.name] = summed_memory_mib(process_tree(pid), "VmHWM")
                say(f"rss {size_mib} MiB {way.name:<14} {elapsed:6.2f} s, peak {peaks[way.name]:.0f} MiB")
            for way in ways:
                relative = ratio(peaks[way.name], peaks[MITMPROXY_TLS])
                rows.append([way.name, size_mib, idle[way.name], peaks[way.name], relative])
                series[way.name].append(peaks[way.name])
    ocigate_peaks = [value for value in series[OCIGATE] if value is not None]
    notes = ["VmHWM (peak resident set) of the proxy process after one GET of the blob; direct has no proxy"]
    if len(ocigate_peaks) >= 2:
        notes.append(
            f"ocigate peak at the largest size / at the smallest: {ocigate_peaks[-1] / ocigate_peaks[0]:.2f} "
            "(target: within 10%)"
        )
    return Scenario(
        name="rss",
        title="3. Peak RSS vs blob size (fresh proxy per size)",
        columns=["way", "blob MiB", "RSS idle MiB", "peak RSS MiB", "peak /mitmproxy+tls"],
        rows=rows,
        chart=Chart("bar", "Proxy peak RSS vs blob size", "blob size", "VmHWM MiB", labels, series),
        notes=notes,
    )


# --- 4. concurrency curve -------------------------------------------------------------------------------------------


def concurrency_scenario(world: World, args: argparse.Namespace) -> Scenario:
    notes = [
        f"a pull: manifest by tag + config + {args.layers} layers of {args.layer_kib} KiB, blobs one after another; "
        f"at concurrency N, max(N, {args.min_pulls}) pulls, median MiB/s of {args.load_rounds} rounds, latencies "
        "of all rounds together",
        "client CPU: the load process's CPU seconds over wall seconds (1.0 = one core busy); proxy CPU the same, "
        "summed over the proxy's processes; RSS: summed VmHWM of the proxy's processes (peak since it started)",
    ]
    with contextlib.ExitStack() as stack:
        ways = [
            direct_way(world.registry),
            proxy_way(MITMPROXY_TLS, world.repointing(world.registry, stack)),
            proxy_way(OCIGATE, world.gateway(stack)),
        ]
        if args.workers > 1:
            try:
                many = world.gateway(stack, workers=args.workers)
                ways.append(proxy_way(f"{OCIGATE} {args.workers} workers", many))
            except WorkersUnsupported as e:
                notes.append(f"{e}: only the 1-worker gateway was measured")
                say(f"concurrency: {e}; measuring 1 worker only")
        rows: list[list[Cell]] = []
        series: dict[str, list[float | None]] = {way.name: [] for way in ways}
        for level in args.concurrency:
            pulls = max(level, args.min_pulls)
            speeds: dict[str, list[float]] = {way.name: [] for way in ways}
            latencies: dict[str, list[float]] = {way.name: [] for way in ways}
            client_cpu: dict[str, list[float]] = {way.name: [] for way in ways}
            proxy_cpu: dict[str, list[float]] = {way.name: [] for way in ways}
            for number in range(1, args.load_rounds + 1):
                for way in ways:
                    pids = way.processes()
                    cpu_before = cpu_seconds(pids)
                    outcome = load(world, way, pulls, level)
                    proxy_cpu[way.name].append((cpu_seconds(pids) - cpu_before) / outcome.wall_seconds)
                    speeds[way.name].append(mib_per_second(outcome.bytes, outcome.wall_seconds))
                    latencies[way.name] += outcome.manifest_ms
                    client_cpu[way.name].append(outcome.cpu_seconds / outcome.wall_seconds)
                    if outcome.stopped:
                        notes.append(f"{way.name} at {level}: {outcome.stopped}")
                    say(
                        f"concurrency {level} round {number}/{args.load_rounds} {way.name:<20} "
                        f"{speeds[way.name][-1]:7.1f} MiB/s, client CPU {client_cpu[way.name][-1]:.2f}"
                    )
            medians: dict[str, float | None] = {name: median(values) for name, values in speeds.items()}
            for way in ways:
                memory = summed_memory_mib(process_tree(way.leg.pid), "VmHWM") if way.leg.pid else None
                rows.append(
                    [
                        way.name,
                        level,
                        medians[way.name],
                        percentile(latencies[way.name], 0.5),
                        percentile(latencies[way.name], 0.99),
                        memory,
                        median(client_cpu[way.name]),
                        median(proxy_cpu[way.name]) if way.leg.pid else None,
                        *versus(medians[way.name], medians),
                    ]
                )
                series[way.name].append(medians[way.name])
    return Scenario(
        name="concurrency",
        title="4. Concurrency curve: concurrent pulls of a small image",
        columns=[
            "way",
            "pulls at once",
            "MiB/s",
            "manifest p50 ms",
            "p99 ms",
            "proxy RSS MiB",
            "client CPU",
            "proxy CPU",
            "MiB/s /mitmproxy+tls",
            "/direct",
        ],
        rows=rows,
        chart=Chart(
            "line",
            "Aggregate throughput vs concurrent pulls",
            "concurrent pulls",
            "MiB/s",
            [float(level) for level in args.concurrency],
            series,
        ),
        notes=notes,
    )


# --- 5. token count -------------------------------------------------------------------------------------------------


def tokens_scenario(world: World, args: argparse.Namespace) -> Scenario:
    notes = [
        f"{TOKEN_PULLS} concurrent pulls of {SMALL_REPOSITORY}:{SMALL_TAG} ({args.layers} layers) from the token-auth "
        "registry; requests counted at the token server. direct and mitmproxy+tls: each pull is a client of its own "
        "and fetches its own token (as 50 separate docker pulls do); ocigate: the clients send no credentials",
        "target (issue 12): through ocigate, exactly one token request per (realm, scope, identity) per token "
        f"lifetime ({TOKEN_LIFETIME:.0f} s here); with N workers, one per worker",
    ]
    rows: list[list[Cell]] = []
    counts: dict[str, float | None] = {}
    with contextlib.ExitStack() as stack:
        ways = [
            direct_way(world.auth_registry),
            proxy_way(MITMPROXY_TLS, world.repointing(world.auth_registry, stack), AUTH_UPSTREAM),
            proxy_way(OCIGATE, world.gateway(stack), AUTH_UPSTREAM),
        ]
        expected = {OCIGATE: 1}
        if args.workers > 1:
            try:
                name = f"{OCIGATE} {args.workers} workers"
                ways.append(proxy_way(name, world.gateway(stack, workers=args.workers), AUTH_UPSTREAM))
                expected[name] = args.workers
            except WorkersUnsupported as e:
                notes.append(f"{e}: only the 1-worker gateway was measured")
        for way in ways:
            world.tokens.clear()
            outcome = load(world, way, TOKEN_PULLS, TOKEN_PULLS, token_per_pull=True)
            requests = world.tokens.requests
            keys = {(request.path, request.scopes, request.account) for request in requests}
            counts[way.name] = float(len(requests))
            target = expected.get(way.name)
            met = None
            if target is not None:
                # One worker: exactly one per key. N workers each cache their own: at most N per key.
                right = len(requests) == len(keys) if target == 1 else len(requests) <= target * len(keys)
                met = "yes" if right else "no"
            say(f"tokens {way.name:<20} {len(requests)} token requests for {outcome.pulls} pulls")
            rows.append([way.name, outcome.pulls, len(requests), len(keys), target, met])
    return Scenario(
        name="tokens",
        title=f"5. Token requests for {TOKEN_PULLS} concurrent pulls from a token-auth registry",
        columns=["way", "pulls", "token requests", "distinct (realm, scope, identity)", "target per key", "met"],
        rows=rows,
        chart=Chart(
            "bar",
            "Token requests for 50 concurrent pulls",
            "way",
            "requests",
            list(counts),
            {"token requests": list(counts.values())},
        ),
        notes=notes,
    )


# --- 6. failover ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port that accepts connections (the kernel completes the handshake into the backlog) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield listener.getsockname()[1]
    finally:
        listener.close()


def failover_rules(directory: Path, first_mirror: bool) -> Path:
    """upstream.test: FIRST_MIRROR (when `first_mirror`), then the registry (as pull.MIRROR); warm.test: the
    registry alone, for warming the gateway up without touching the first mirror."""
    for upstream, hosts in (
        (pull.UPSTREAM, [FIRST_MIRROR, pull.MIRROR] if first_mirror else [pull.MIRROR]),
        (WARM_UPSTREAM, [pull.MIRROR]),
    ):
        (directory / upstream).mkdir(parents=True)
        tables = "".join(f'[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n\n' for host in hosts)
        (directory / upstream / "hosts.toml").write_text(f'server = "https://{upstream}"\n\n{tables}')
    return directory


def first_and_next(way: Way, digest: str, warm: bool) -> tuple[float, list[float]]:
    """The first manifest GET by tag and the FAILOVER_NEXT after it, on a connection opened by a GET /v2/ (which
    ocigate answers itself, without asking a host). With `warm`, a few manifest GETs through warm.test first, so that
    the first request measured pays for the failover, not for the gateway's first request ever."""
    repository, tag = pull.REPOSITORY, pull.TAG
    with client(way) as session:
        if warm:
            warming = dataclasses.replace(way, leg=dataclasses.replace(way.leg, base_url=f"https://{WARM_UPSTREAM}"))
            for _ in range(FAILOVER_WARMUP):
                manifest_get(session, warming, repository, tag, digest)
        ping = session.get(f"{way.leg.base_url}/v2/", headers=way.headers())
        if ping.status_code != 200:
            raise BenchError(f"{way.name}: GET /v2/ answered {ping.status_code}")
        first = manifest_get(session, way, repository, tag, digest)
        deadline = time.monotonic() + pull.MANIFEST_LEG_SECONDS
        following = []
        for _ in range(FAILOVER_NEXT):
            if time.monotonic() > deadline:
                break
            following.append(manifest_get(session, way, repository, tag, digest))
    return first, following


@dataclass(frozen=True)
class FirstMirror:
    """What a gateway's access log says of its manifest GETs to upstream.test: how many were logged, and how many of
    them asked FIRST_MIRROR (it was tried, and answered or failed) rather than pass over it in its cool-down."""

    logged: int
    asked: int


def first_mirror_asked(access_log: Path) -> FirstMirror:
    """FirstMirror from a gateway's access log; BenchError when there is none (nothing logged is not "not asked")."""
    try:
        text = access_log.read_text()
    except OSError as e:
        raise BenchError(f"failover: the gateway's access log cannot be read: {e}") from e
    logged = asked = 0
    for line in (json.loads(entry) for entry in text.splitlines()):
        if line["upstream"] == pull.UPSTREAM and line["kind"] == "manifest":
            logged += 1
            first = [host for host in line["hosts"] if FIRST_MIRROR in host["host"]]
            asked += sum(1 for host in first if host["reason"] != Reason.COOLDOWN)
    return FirstMirror(logged, asked)


def failover_scenario(world: World, args: argparse.Namespace) -> Scenario:
    digest = world.content.manifest.digest
    timeout_option = f"ocigate_read_timeout={args.blackhole_timeout}"
    refused_port = free_port()  # nothing listens there: connections are refused
    firsts: dict[str, list[float]] = {}
    following: dict[str, list[float]] = {}
    asked: dict[str, list[int]] = {}  # per round, the manifest GETs that asked the first mirror
    access_logs: dict[str, Path] = {}  # the access log of each running gateway
    with blackhole() as hole_port:

        def ocigate_way(name: str, port: int | None) -> Callable[[contextlib.ExitStack], Way]:
            def start(stack: contextlib.ExitStack) -> Way:
                rules = failover_rules(world.directory("failover-rules"), first_mirror=port is not None)
                host_map = {FIRST_MIRROR: f"127.0.0.1:{port}"} if port is not None else {}
                logs = world.directory("failover-log")
                logs.mkdir(parents=True)
                access_logs[name] = logs / "access.log"
                options = [timeout_option, f"ocigate_access_log={access_logs[name]}"]
                return proxy_way(name, world.gateway(stack, rules=rules, host_map=host_map, options=options))

            return start

        cases: list[tuple[str, Callable[[contextlib.ExitStack], Way]]] = [
            (DIRECT, lambda stack: direct_way(world.registry)),
            (MITMPROXY_TLS, lambda stack: proxy_way(MITMPROXY_TLS, world.repointing(world.registry, stack))),
            (HEALTHY, ocigate_way(HEALTHY, None)),
            ("ocigate refusing first", ocigate_way("ocigate refusing first", refused_port)),
            ("ocigate blackholed first", ocigate_way("ocigate blackholed first", hole_port)),
        ]
        for number in range(1, args.failover_rounds + 1):
            for name, start_way in cases:
                with contextlib.ExitStack() as stack:  # a fresh proxy per case and round: nothing learnt carries over
                    way = start_way(stack)
                    first, next_ones = first_and_next(way, digest, warm=name.startswith(OCIGATE))
                if name in access_logs:  # the gateway's, complete once it has stopped
                    found = first_mirror_asked(access_logs.pop(name))
                    if found.logged != 1 + len(next_ones):
                        raise BenchError(
                            f"failover: {name}'s access log holds {found.logged} manifest GETs, not "
                            f"the {1 + len(next_ones)} sent"
                        )
                    asked.setdefault(name, []).append(found.asked)
                firsts.setdefault(name, []).append(first)
                following.setdefault(name, []).extend(next_ones)
                say(
                    f"failover round {number}/{args.failover_rounds} {name:<26} first {first:8.1f} ms, "
                    f"next p50 {percentile(next_ones, 0.5):.2f} ms"
                )
    first_median = {name: median(values) for name, values in firsts.items()}
    p50 = {name: percentile(values, 0.5) for name, values in following.items()}
    rows: list[list[Cell]] = []
    for name in firsts:
        is_ocigate = name.startswith(OCIGATE)
        rows.append(
            [
                name,
                first_median[name],
                p50[name],
                percentile(following[name], 0.95),
                first_median[name] - first_median[HEALTHY] if is_ocigate else None,
                p50[name] - p50[HEALTHY] if is_ocigate else None,
                *versus(p50[name], dict(p50.items())),
                " ".join(str(count) for count in asked[name]) if name in asked else None,
            ]
        )
    return Scenario(
        name="failover",
        title=f"6. Failover: manifest by tag, the first request and the next {FAILOVER_NEXT} (ms), "
        f"{args.failover_rounds} rounds",
        columns=[
            "way",
            "first ms",
            f"next {FAILOVER_NEXT} p50",
            "p95",
            "first added over healthy",
            "next p50 added",
            "next p50 /mitmproxy+tls",
            "/direct",
            "first mirror asked, per round",
        ],
        rows=rows,
        chart=Chart(
            "bar",
            f"Failover: first request and the next {FAILOVER_NEXT} (log scale)",
            "requests",
            "ms",
            ["first", f"next {FAILOVER_NEXT} p50"],
            {name: [first_median[name], p50[name]] for name in firsts},
            log_y=True,
        ),
        notes=[
            "a fresh proxy per way and round; first: median over rounds; next: all rounds together",
            f"each gateway is warmed up first by {FAILOVER_WARMUP} manifest GETs through {WARM_UPSTREAM} (the registry "
            "alone), then the client's connection is opened by a GET /v2/, which ocigate answers itself",
            f"ocigate_read_timeout={args.blackhole_timeout} s on the gateways (default 60): a blackholed host accepts "
            "and never answers, so it costs that once, then it cools down (ocigate_cooldown, 30 s)",
            f"first mirror asked: of the {FAILOVER_NEXT + 1} manifest GETs of a round, those that asked "
            f"{FIRST_MIRROR} rather than pass over it in its cool-down (each gateway's access log, hosts[].reason)",
            "targets (issue 12): a refusing first mirror adds <= 5 ms to the first request and nothing measurable to "
            "the next 100; a blackholed one costs its timeout once",
        ],
    )


# --- the run --------------------------------------------------------------------------------------------------------


def setup(workdir: Path, stack: contextlib.ExitStack, args: argparse.Namespace) -> World:
    registry = stack.enter_context(running_registry(workdir / "registry"))
    say(f"pushing a {args.blob_mib} MiB blob and a {args.layers}-layer image to the registry at {registry.url}")
    content = pull.push_content(registry, args.blob_mib)
    small = make_image("bench-small", layers=args.layers, layer_size=args.layer_kib * 1024)
    push_image(registry.url, SMALL_REPOSITORY, SMALL_TAG, small)
    tokens = stack.enter_context(running_token_server(workdir / "tokens", {ACCOUNT: PASSWORD}, lifetime=TOKEN_LIFETIME))
    auth_registry = stack.enter_context(
        running_registry(workdir / "auth-registry", extra_config=tokens.registry_auth_config())
    )
    pusher = tokens.mint("pusher", [{"type": "repository", "name": SMALL_REPOSITORY, "actions": ["pull", "push"]}])
    with httpx.Client(headers={"Authorization": f"Bearer {pusher}"}, trust_env=False, timeout=60.0) as session:
        push_image(auth_registry.url, SMALL_REPOSITORY, SMALL_TAG, small, client=session)
    tokens.clear()
    return World(workdir, registry, content, small, tokens, auth_registry)


RUNNERS: dict[str, Callable[[World, argparse.Namespace], Scenario]] = {
    "blob": blob_scenario,
    "manifest": manifest_scenario,
    "rss": rss_scenario,
    "concurrency": concurrency_scenario,
    "tokens": tokens_scenario,
    "failover": failover_scenario,
}


def run(args: argparse.Namespace) -> Path:
    machine = this_machine()
    date = datetime.date.today().isoformat()
    print(
        f"ocigate benchmark {date}: {machine.cores} cores ({machine.cpu_model}), Python {machine.python}, "
        f"mitmproxy {machine.mitmproxy}, Linux {machine.kernel}"
    )
    scenarios: list[Scenario] = []
    with tempfile.TemporaryDirectory(prefix="ocigate-bench-") as temporary, contextlib.ExitStack() as stack:
        world = setup(Path(temporary), stack, args)
        for name in args.scenarios:
            say(f"--- scenario {name}")
            scenarios.append(show(RUNNERS[name](world, args)))
    settings = {key: value for key, value in vars(args).items() if key not in ("results", "baseline_addons")}
    if args.baseline_addons is not None:
        settings["baseline_addons"] = addons_label(args.baseline_addons)
    results = Results(date=date, machine=machine, settings=settings, scenarios=scenarios)
    path = save(results, args.results)
    for chart in draw_all(results, args.results):
        say(f"chart: {chart}")
    print(f"\nresults: {path}")
    return path


def addons_label(addons: Path) -> str:
    """What an ocigate's `addons/` directory is, for the results: its checkout's commit (the path would name this
    machine's directories), else the directory's name."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(addons), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return addons.name
    return f"at commit {commit}"


def numbers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from e
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be at least 1")
    return values


def scenario_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        known = ",".join(SCENARIOS)
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown) or repr(text)}; known: {known}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./run.sh bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds: a run of a few minutes")
    parser.add_argument("--scenarios", type=scenario_names, default=list(SCENARIOS), help=",".join(SCENARIOS))
    parser.add_argument("--blob-mib", type=int, help="blob scenario: blob size (256; quick 64)")
    parser.add_argument("--rounds", type=int, help="blob GETs per way and client (3; quick 2)")
    parser.add_argument("--requests", type=int, help="manifest GETs per way and round (100; quick 50)")
    parser.add_argument("--manifest-rounds", type=int, help="manifest: interleaved rounds (20; quick 4)")
    parser.add_argument("--rss-mib", type=numbers, help="rss scenario: blob sizes in MiB (256,2048; quick 64,256)")
    parser.add_argument("--concurrency", type=numbers, help="concurrent pulls (1,10,50,200)")
    parser.add_argument("--layers", type=int, default=10, help="layers of the small image (10)")
    parser.add_argument("--layer-kib", type=int, help="size of each of its layers (1024; quick 256)")
    parser.add_argument("--min-pulls", type=int, default=20, help="pulls per load run at least (20)")
    parser.add_argument("--load-rounds", type=int, help="load runs per way and concurrency (3; quick 2)")
    parser.add_argument("--workers", type=int, default=2, help="also measure `ocigate --workers N` (2); 1: not")
    parser.add_argument("--failover-rounds", type=int, help="fresh proxies per failover case (3; quick 2)")
    parser.add_argument("--blackhole-timeout", type=int, default=2, help="failover: ocigate_read_timeout (2 s)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIRECTORY, help="where the JSON and charts go")
    parser.add_argument(
        "--baseline-addons",
        type=Path,
        help="manifest: also measure the ocigate in this addons/ directory (an earlier commit's), as a way of its own",
    )
    args = parser.parse_args(argv)
    defaults = {
        "blob_mib": (256, 64),
        "rounds": (3, 2),
        "requests": (100, 50),
        "manifest_rounds": (20, 4),
        "rss_mib": ([256, 2048], [64, 256]),
        "concurrency": ([1, 10, 50, 200], [1, 10, 50, 200]),
        "layer_kib": (1024, 256),
        "load_rounds": (3, 2),
        "failover_rounds": (3, 2),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in (
        "blob_mib",
        "rounds",
        "requests",
        "manifest_rounds",
        "layers",
        "layer_kib",
        "min_pulls",
        "load_rounds",
        "failover_rounds",
        "workers",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.blackhole_timeout < 1:
        parser.error("--blackhole-timeout must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return pull.run_guarded("bench", lambda: run(args), (BenchError, pull.BenchError, NotReady))
