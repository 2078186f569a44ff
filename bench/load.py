"""The concurrent puller: `python -m bench.load SPEC.json` pulls an image `pulls` times, `concurrency` at a time, and
prints what it measured as JSON on stdout.

It runs as a process of its own, so that its CPU time is its own (reported, with the wall time, so that the output
can say how much of the 2 cores the client took) and so that its event loop does not share a core's time slices
with the benchmark's bookkeeping. One pull is what a registry client does: GET the manifest by tag, then GET its
config and layers one after another; blobs are counted, not hashed (hashing is the proxies' work here, and the
client's CPU must stay small); the manifest is checked against its digest. A 401 with a Bearer challenge is answered
as clients do: a token from the realm (basic auth with the spec's account), asked once per pull (each pull a client
of its own) or once for the whole run.

Bounded: at most `pulls` pulls, stopped after `time_limit` seconds with what was measured so far (and saying so).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import resource
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CHALLENGE_PARAMETER = re.compile(r'(\w+)="([^"]*)"')
_KEEP_ERRORS = 5


@dataclass(frozen=True)
class Spec:
    base_url: str  # scheme://host[:port] the client asks for
    proxy: str | None
    ca_path: str | None  # the proxy's CA, for https:// through it
    repository: str
    tag: str
    manifest_digest: str
    pulls: int
    concurrency: int
    time_limit: float
    username: str | None = None  # for a token realm's basic auth
    password: str | None = None
    token_per_pull: bool = True

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))


@dataclass
class Outcome:
    pulls: int = 0
    bytes: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    manifest_ms: list[float] = field(default_factory=list)
    token_requests: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    stopped: str = ""


class PullError(Exception):
    pass


class Tokens:
    """Bearer tokens by scope, for one pull or for the whole run."""

    def __init__(self, spec: Spec, outcome: Outcome) -> None:
        self.spec = spec
        self.outcome = outcome
        self.tokens: dict[str, str] = {}
        self.lock = asyncio.Lock()

    async def token(self, realm_client: httpx.AsyncClient, challenge: str) -> str:
        parameters = dict(_CHALLENGE_PARAMETER.findall(challenge))
        scope = parameters.get("scope", "")
        async with self.lock:
            if scope in self.tokens:
                return self.tokens[scope]
            auth = (self.spec.username, self.spec.password or "") if self.spec.username else None
            query = {"service": parameters.get("service", ""), "scope": scope}
            self.outcome.token_requests += 1
            response = await realm_client.get(parameters["realm"], params=query, auth=auth)
            if response.status_code != 200:
                raise PullError(f"token realm answered {response.status_code}")
            token = str(response.json()["token"])
            self.tokens[scope] = token
            return token


async def get(
    client: httpx.AsyncClient, realm_client: httpx.AsyncClient, tokens: Tokens, url: str, headers: dict[str, str]
) -> httpx.Response:
    """GET with the body streamed and counted; a Bearer challenge answered once."""
    for _attempt in range(2):
        request = client.build_request("GET", url, headers=headers)
        response = await client.send(request, stream=True)
        try:
            if response.status_code == 401 and "bearer" in response.headers.get("WWW-Authenticate", "").lower():
                await response.aread()
                token = await tokens.token(realm_client, response.headers["WWW-Authenticate"])
                headers = {**headers, "Authorization": f"Bearer {token}"}
                continue
            if response.status_code != 200:
                await response.aread()
                raise PullError(f"GET {url} answered {response.status_code}: {response.text[:200]}")
            await response.aread()
            return response
        finally:
            await response.aclose()
    raise PullError(f"GET {url}: still 401 with a token")


async def pull(
    spec: Spec, client: httpx.AsyncClient, realm_client: httpx.AsyncClient, tokens: Tokens, outcome: Outcome
) -> None:
    headers = {"Accept": OCI_MANIFEST}
    base = f"{spec.base_url}/v2/{spec.repository}"
    started = time.perf_counter()
    manifest = await get(client, realm_client, tokens, f"{base}/manifests/{spec.tag}", headers)
    outcome.manifest_ms.append((time.perf_counter() - started) * 1000)
    if "sha256:" + hashlib.sha256(manifest.content).hexdigest() != spec.manifest_digest:
        raise PullError(f"wrong manifest: {manifest.content[:200]!r}")
    document = json.loads(manifest.content)
    received = len(manifest.content)
    # The token the manifest needed serves the blobs too.
    blob_headers = {key: value for key, value in manifest.request.headers.items() if key.lower() == "authorization"}
    for descriptor in [document["config"], *document["layers"]]:
        blob = await get(client, realm_client, tokens, f"{base}/blobs/{descriptor['digest']}", blob_headers)
        if len(blob.content) != descriptor["size"]:
            raise PullError(f"blob {descriptor['digest']}: {len(blob.content)} bytes, expected {descriptor['size']}")
        received += len(blob.content)
    outcome.bytes += received
    outcome.pulls += 1


async def run(spec: Spec) -> Outcome:
    outcome = Outcome()
    verify: ssl.SSLContext | bool = True
    if spec.ca_path:
        verify = ssl.create_default_context(cafile=spec.ca_path)
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    timeout = httpx.Timeout(60.0)
    shared = Tokens(spec, outcome)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(spec.pulls):
        queue.put_nowait(number)

    async with (
        httpx.AsyncClient(proxy=spec.proxy, verify=verify, limits=limits, timeout=timeout, trust_env=False) as client,
        httpx.AsyncClient(timeout=timeout, trust_env=False) as realm_client,
    ):

        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                tokens = Tokens(spec, outcome) if spec.token_per_pull else shared
                try:
                    await pull(spec, client, realm_client, tokens, outcome)
                except (PullError, httpx.HTTPError, KeyError, ValueError) as e:
                    outcome.error_count += 1
                    if len(outcome.errors) < _KEEP_ERRORS:
                        outcome.errors.append(f"{type(e).__name__}: {e}")

        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(spec.concurrency)]
        _, pending = await asyncio.wait(workers, timeout=spec.time_limit)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            outcome.stopped = f"stopped after {spec.time_limit:.0f} s"
        outcome.wall_seconds = time.perf_counter() - started
        outcome.cpu_seconds = _cpu_seconds() - cpu_before
    return outcome


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m bench.load SPEC.json", file=sys.stderr)
        return 2
    spec = Spec.from_json(Path(arguments[0]).read_text())
    outcome = asyncio.run(run(spec))
    json.dump(asdict(outcome), sys.stdout)
    return 0


def parse_outcome(text: str) -> Outcome:
    document: dict[str, Any] = json.loads(text)
    return Outcome(**document)


if __name__ == "__main__":
    sys.exit(main())
