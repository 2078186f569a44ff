"""Pull benchmark: blob throughput, proxy peak memory and manifest latency of ocigate against plain mitmproxy and
against going to the registry directly.

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m bench.pull'

One real registry (Debian's docker-registry) on loopback holds one large blob of random bytes and a small manifest
that names it. Four ways to get them, all with one httpx client in this process:

- direct:        httpx to the registry's http:// URL;
- mitmproxy:     httpx through a plain `mitmdump` (no addons) as HTTP proxy to the same http:// URL;
- mitmproxy+tls: httpx to https://upstream.test through mitmdump with bench/repoint_addon.py (CONNECT and TLS
                 interception as with ocigate, then re-pointed to the registry): mitmproxy's cost for what the
                 ocigate leg does on the wire, without ocigate's own work;
- ocigate:       httpx to https://upstream.test through the real gateway, whose hosts.toml sends upstream.test to the
                 registry (first host) with the unreachable server as fallback: a blob GET costs a HEAD probe by
                 ocigate's own client, then mitmproxy streams the body; a manifest by tag is fetched by ocigate's own
                 client and answered.

Plain mitmproxy buffers every body in memory unless told to stream: `stream_large_bodies=1m` (mitmproxy's option for
that) makes it stream anything above 1 MiB, which is what ocigate does for blobs by setting `flow.response.stream`.
Both mitmdumps also get `connection_strategy=lazy`, which ocigate forces.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
import mitmproxy.version

from tests.support.gateway import Gateway, running_gateway, running_mitmproxy
from tests.support.images import OCI_CONFIG, OCI_MANIFEST, Blob, push_blob, push_manifest
from tests.support.processes import NotReady
from tests.support.registry import Registry, running_registry

MIB = 1024 * 1024
UPSTREAM = "upstream.test"
MIRROR = "mirror.test:5000"  # the registry's name in hosts.toml; only the gateway's host map knows where it is
REPOSITORY = "bench/big"
TAG = "v1"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"  # the registry does not look inside

REPOINT_ADDON = Path(__file__).with_name("repoint_addon.py")
# Bounds on every load loop, besides their counts.
BLOB_GET_SECONDS_BASE = 30.0
BLOB_GET_SECONDS_PER_MIB = 0.5  # a GET slower than ~2 MiB/s is stopped as broken, not measured
MANIFEST_LEG_SECONDS = 60.0
MANIFEST_WARMUP = 5
CLIENT_TIMEOUT = httpx.Timeout(30.0)


class BenchError(Exception):
    """Something answered wrongly: a wrong body is an error, not a result."""


@dataclass(frozen=True)
class Content:
    blob_digest: str
    blob_size: int
    manifest: Blob


@dataclass(frozen=True)
class Leg:
    name: str
    base_url: str  # scheme://host[:port] the client asks for
    proxy: str | None
    verify: ssl.SSLContext | bool
    pid: int | None  # the proxy process, for its memory

    def blob_url(self, content: Content) -> str:
        return f"{self.base_url}/v2/{REPOSITORY}/blobs/{content.blob_digest}"

    def manifest_url(self) -> str:
        return f"{self.base_url}/v2/{REPOSITORY}/manifests/{TAG}"


@dataclass
class LegResult:
    blob_seconds: list[float] = field(default_factory=list)
    http_version: str = ""
    rss_idle_mib: float | None = None
    rss_peak_mib: float | None = None
    manifest_ms: list[float] = field(default_factory=list)
    manifest_note: str = ""

    def mib_per_second(self, size: int) -> float:
        return size / MIB / statistics.median(self.blob_seconds)

    def median_ms(self) -> float:
        return statistics.median(self.manifest_ms)

    def p95_ms(self) -> float:
        ordered = sorted(self.manifest_ms)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# --- the content -------------------------------------------------------------------------------------------------


def push_content(registry: Registry, blob_mib: int) -> Content:
    """One blob of random bytes and a manifest naming it (and a tiny config), pushed by tag."""
    layer = Blob.of(LAYER_MEDIA_TYPE, os.urandom(blob_mib * MIB))
    config = Blob.of(OCI_CONFIG, json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }
    manifest = Blob.of(OCI_MANIFEST, json.dumps(document, separators=(",", ":")).encode())
    with httpx.Client(timeout=httpx.Timeout(120.0), trust_env=False) as client:
        push_blob(registry.url, REPOSITORY, config, client)
        push_blob(registry.url, REPOSITORY, layer, client)
        push_manifest(registry.url, REPOSITORY, TAG, manifest, client)
    return Content(layer.digest, layer.size, manifest)


def write_rules(directory: Path) -> Path:
    """hosts.toml for upstream.test: the registry first (as MIRROR), the upstream itself (unreachable) last."""
    (directory / UPSTREAM).mkdir(parents=True)
    (directory / UPSTREAM / "hosts.toml").write_text(
        f'server = "https://{UPSTREAM}"\n\n[host."http://{MIRROR}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return directory


# --- plain mitmdump ----------------------------------------------------------------------------------------------


def mitmdump_command() -> list[str]:
    beside = Path(sys.executable).with_name("mitmdump")
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


@contextlib.contextmanager
def running_mitmdump(workdir: Path, scripts: Sequence[Path] = (), options: Sequence[str] = ()) -> Iterator[Gateway]:
    """mitmdump on a free loopback port, streaming bodies above 1 MiB; stopped on exit, whatever happened. Started
    and stopped as the tests' gateway is (tests/support/gateway.py), with other arguments."""
    arguments = ["--set", "connection_strategy=lazy", "--set", "stream_large_bodies=1m"]
    for script in scripts:
        arguments += ["-s", str(script)]
    for option in options:
        arguments += ["--set", option]
    with running_mitmproxy(workdir, mitmdump_command(), arguments, name="mitmdump", log_name="mitmdump.log") as proxy:
        yield proxy


def memory_mib(pid: int, field_name: str) -> float:
    """VmHWM (peak resident set) or VmRSS of a process, from /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise BenchError(f"no {field_name} in /proc/{pid}/status: the proxy has exited")


# --- measuring ---------------------------------------------------------------------------------------------------


def new_client(leg: Leg, http2: bool) -> httpx.Client:
    # With http2 the http:// legs still speak HTTP/1.1 (httpx does not do h2c), the https:// ones negotiate h2.
    return httpx.Client(
        proxy=leg.proxy,
        verify=leg.verify,
        http1=True,
        http2=http2,
        trust_env=False,
        timeout=CLIENT_TIMEOUT,
        follow_redirects=False,
    )


def get_blob(leg: Leg, content: Content, http2: bool) -> tuple[float, str]:
    """Seconds for one blob GET on a new connection, first byte of the request to last byte of the body, hashed as
    read; and the HTTP version spoken."""
    limit = BLOB_GET_SECONDS_BASE + BLOB_GET_SECONDS_PER_MIB * content.blob_size / MIB
    hasher = hashlib.sha256()
    received = 0
    with new_client(leg, http2) as client:
        started = time.perf_counter()
        with client.stream("GET", leg.blob_url(content)) as response:
            if response.status_code != 200:
                response.read()
                raise BenchError(f"{leg.name}: blob GET answered {response.status_code}: {response.text[:500]}")
            for chunk in response.iter_raw():
                hasher.update(chunk)
                received += len(chunk)
                if time.perf_counter() - started > limit:
                    raise BenchError(f"{leg.name}: blob GET still running after {limit:.0f} s ({received} bytes)")
            http_version = response.http_version
        elapsed = time.perf_counter() - started
    digest = "sha256:" + hasher.hexdigest()
    if received != content.blob_size or digest != content.blob_digest:
        raise BenchError(
            f"{leg.name}: wrong blob: {received} bytes with {digest}, "
            f"expected {content.blob_size} bytes with {content.blob_digest}"
        )
    return elapsed, http_version


def get_manifests(leg: Leg, content: Content, count: int, http2: bool) -> tuple[list[float], str]:
    """Milliseconds of `count` sequential manifest GETs by tag on one keep-alive client, after a few unmeasured ones
    (connection, TLS handshake); stops early, saying so, after MANIFEST_LEG_SECONDS."""
    headers = {"Accept": OCI_MANIFEST}
    timings: list[float] = []
    note = ""
    deadline = time.monotonic() + MANIFEST_LEG_SECONDS
    with new_client(leg, http2) as client:
        for number in range(MANIFEST_WARMUP + count):
            if time.monotonic() > deadline:
                note = f"stopped after {MANIFEST_LEG_SECONDS:.0f} s"
                break
            started = time.perf_counter()
            response = client.get(leg.manifest_url(), headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise BenchError(f"{leg.name}: manifest GET answered {response.status_code}: {response.text[:500]}")
            if "sha256:" + hashlib.sha256(response.content).hexdigest() != content.manifest.digest:
                raise BenchError(f"{leg.name}: wrong manifest body: {response.content[:200]!r}")
            if number >= MANIFEST_WARMUP:
                timings.append(elapsed * 1000)
    if not timings:
        raise BenchError(f"{leg.name}: no manifest GET finished within {MANIFEST_LEG_SECONDS:.0f} s")
    return timings, note


# --- the run -----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pull", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blob-mib", type=int, default=256, help="size of the blob in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="blob GETs per way; the median counts (default 3)")
    parser.add_argument("--requests", type=int, default=200, help="manifest GETs per way (default 200)")
    parser.add_argument(
        "--http2",
        action="store_true",
        help="the client offers HTTP/2 (h2 first) on the https:// legs; the http:// ones stay HTTP/1.1. Needs h2",
    )
    args = parser.parse_args(argv)
    for name in ("blob_mib", "rounds", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.http2:
        try:
            import h2  # noqa: F401
        except ImportError:
            print("--http2: the h2 package is not installed; the client speaks HTTP/1.1", file=sys.stderr)
            args.http2 = False
    return args


class H2FirstContext(ssl.SSLContext):
    """httpx offers ALPN "http/1.1" before "h2", and mitmproxy takes the client's first choice; httpx's way to offer
    h2 alone (http1=False) also speaks HTTP/2 with prior knowledge to the proxy itself, which mitmproxy refuses. So
    the offer is reordered: h2 first."""

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(sorted(alpn_protocols, key=lambda protocol: protocol != "h2"))


def trusting(ca_path: Path) -> ssl.SSLContext:
    context = H2FirstContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_path))
    return context


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    http2: bool = args.http2
    with tempfile.TemporaryDirectory(prefix="ocigate-bench-") as temporary, contextlib.ExitStack() as stack:
        workdir = Path(temporary)
        registry = stack.enter_context(running_registry(workdir / "registry"))
        say(f"pushing a {args.blob_mib} MiB blob and a manifest to the registry at {registry.url}")
        content = push_content(registry, args.blob_mib)
        registry_address = f"127.0.0.1:{registry.port}"
        plain = stack.enter_context(running_mitmdump(workdir / "mitmproxy"))
        repointing = stack.enter_context(
            running_mitmdump(
                workdir / "mitmproxy-tls", scripts=[REPOINT_ADDON], options=[f"bench_repoint_to={registry_address}"]
            )
        )
        gateway = stack.enter_context(
            running_gateway(workdir / "ocigate", write_rules(workdir / "rules"), {MIRROR: registry_address})
        )
        legs = [
            Leg("direct", registry.url, None, True, None),
            Leg("mitmproxy", registry.url, plain.proxy_url, True, plain.process.pid),
            Leg(
                "mitmproxy+tls",
                f"https://{UPSTREAM}",
                repointing.proxy_url,
                trusting(repointing.ca_path),
                repointing.process.pid,
            ),
            Leg("ocigate", f"https://{UPSTREAM}", gateway.proxy_url, trusting(gateway.ca_path), gateway.process.pid),
        ]
        results = {leg.name: LegResult() for leg in legs}
        for leg in legs:
            if leg.pid is not None:
                results[leg.name].rss_idle_mib = memory_mib(leg.pid, "VmRSS")

        # Rounds interleave the ways, so that drift of the machine hits all of them alike.
        for round_number in range(1, args.rounds + 1):
            for leg in legs:
                seconds, http_version = get_blob(leg, content, http2)
                results[leg.name].blob_seconds.append(seconds)
                results[leg.name].http_version = http_version
                mib_s = content.blob_size / MIB / seconds
                say(f"blob round {round_number}/{args.rounds} {leg.name:<14} {seconds:6.2f} s {mib_s:8.1f} MiB/s")
        for leg in legs:
            if leg.pid is not None:
                results[leg.name].rss_peak_mib = memory_mib(leg.pid, "VmHWM")

        for leg in legs:
            timings, note = get_manifests(leg, content, args.requests, http2)
            results[leg.name].manifest_ms = timings
            results[leg.name].manifest_note = note
            say(f"manifests {leg.name:<14} median {statistics.median(timings):6.2f} ms ({len(timings)} GETs) {note}")

        report(args, content, legs, results)


def report(args: argparse.Namespace, content: Content, legs: Sequence[Leg], results: dict[str, LegResult]) -> None:
    direct, plain, ocigate = results["direct"], results["mitmproxy"], results["ocigate"]
    print()
    print(
        f"ocigate pull benchmark: {content.blob_size // MIB} MiB blob x {args.rounds} rounds (median), "
        f"{args.requests} manifest GETs; Python {platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}, "
        f"httpx {httpx.__version__}, {os.cpu_count()} CPUs"
    )
    print()
    print(f"{'way':<14} {'HTTP':>8} {'blob MiB/s':>10} {'rounds s':>17} {'RSS idle':>9} {'RSS peak':>9}")
    for leg in legs:
        result = results[leg.name]
        rounds = " ".join(f"{s:.2f}" for s in result.blob_seconds)
        idle = f"{result.rss_idle_mib:.0f} MiB" if result.rss_idle_mib is not None else "-"
        peak = f"{result.rss_peak_mib:.0f} MiB" if result.rss_peak_mib is not None else "-"
        print(
            f"{leg.name:<14} {result.http_version:>8} {result.mib_per_second(content.blob_size):>10.1f} "
            f"{rounds:>17} {idle:>9} {peak:>9}"
        )
    print()
    print(f"{'way':<14} {'manifest median ms':>18} {'p95 ms':>8} {'added ms':>9}")
    for leg in legs:
        result = results[leg.name]
        added = "-" if leg.name == "direct" else f"{result.median_ms() - direct.median_ms():+.2f}"
        note = f"  ({result.manifest_note})" if result.manifest_note else ""
        print(f"{leg.name:<14} {result.median_ms():>18.2f} {result.p95_ms():>8.2f} {added:>9}{note}")
    print()
    size = content.blob_size
    print(
        f"blob throughput  ocigate/mitmproxy {ocigate.mib_per_second(size) / plain.mib_per_second(size):.2f}   "
        f"ocigate/direct {ocigate.mib_per_second(size) / direct.mib_per_second(size):.2f}   "
        f"ocigate/mitmproxy+tls "
        f"{ocigate.mib_per_second(size) / results['mitmproxy+tls'].mib_per_second(size):.2f}"
    )
    if ocigate.rss_peak_mib and plain.rss_peak_mib:
        print(f"peak RSS         ocigate/mitmproxy {ocigate.rss_peak_mib / plain.rss_peak_mib:.2f}")
    print(
        f"manifest median  ocigate/mitmproxy {ocigate.median_ms() / plain.median_ms():.2f}   "
        f"ocigate/direct {ocigate.median_ms() / direct.median_ms():.2f}"
    )


def run_guarded(program: str, run: Callable[[], None], errors: tuple[type[Exception], ...]) -> int:
    """Runs a benchmark's `run` as its command: SIGTERM unwinds it as Ctrl-C does, so that every process started is
    stopped on the way out; an error of `errors` (something answered wrongly) is said in one line. The exit status."""

    def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
        print(f"{program}: terminated; everything started is stopped", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run()
    except errors as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted; everything started is stopped", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded("bench.pull", lambda: run(args), (BenchError, NotReady))


if __name__ == "__main__":
    sys.exit(main())
