"""Load with a mirror dying under it: 200 concurrent pulls of a multi-layer image through the real gateway, mirror A
first in the host list and killed (its listener closed, its connections cut) once half the pulls are done; mirror B
has the same registry behind it. Every pull must end with the right bytes, and the gateway's memory afterwards stays
bounded.

The pullers do what docker does with a layer whose download broke: they ask for it again, a few times. What the
gateway promises is that a broken transfer is visible (never a wrong blob taken for a right one) and that the retry
goes to a host that can serve it.
"""

import asyncio
import ssl
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.faulty_host import FaultyHost, running_faulty_host
from tests.support.gateway import Gateway, running_gateway
from tests.support.hoststoml import write_mirror_rules
from tests.support.images import Image, make_image, push_image, sha256_digest
from tests.support.recorder import Recorder, recording_proxy
from tests.support.registry import running_registry

UPSTREAM = "upstream.test"
PULLS = 200
# How often a puller asks again for a blob whose transfer broke, as docker retries a layer download.
RETRIES = 3
# Whatever one pull may take on two loaded cores; the test ends on its own if the gateway stops answering.
PULL_DEADLINE = 120.0
MAX_GATEWAY_RSS = 250 * 1024 * 1024


@dataclass
class World:
    a: FaultyHost
    b: Recorder
    gateway: Gateway
    image: Image


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("load")
    image = make_image("load-app", layers=4, layer_size=256 * 1024)
    with running_registry(workdir / "registry") as registry:
        push_image(registry.url, "team/app", "v1", image)
        rules = write_mirror_rules(workdir / "rules", UPSTREAM, ["http://a.test:5000", "http://b.test:5000"])
        with running_faulty_host(registry.url) as a, recording_proxy(registry.url) as b:
            host_map = {"a.test:5000": f"127.0.0.1:{a.port}", "b.test:5000": f"127.0.0.1:{b.port}"}
            with running_gateway(workdir / "gateway", rules, host_map) as gateway:
                yield World(a, b, gateway, image)


@dataclass
class Pulled:
    ok: bool
    retries: int
    why: str = ""


async def pull(client: httpx.AsyncClient, image: Image) -> Pulled:
    """A pull by tag: the manifest, then the config and every layer, each checked against its digest."""
    base = f"https://{UPSTREAM}/v2/team/app"
    retries = 0
    for what, digest, url in [
        ("manifest", image.manifest.digest, f"{base}/manifests/v1"),
        *[("blob", b.digest, f"{base}/blobs/{b.digest}") for b in (image.config, *image.layers)],
    ]:
        for attempt in range(RETRIES + 1):
            try:
                response = await client.get(url, headers={"Accept": image.manifest.media_type})
            except httpx.TransportError as e:
                why = f"{what} {digest}: {type(e).__name__}"
            else:
                if response.status_code == 200 and sha256_digest(response.content) == digest:
                    break
                if response.status_code == 200:
                    # The one thing that must never happen: a complete answer that is not what was asked for.
                    return Pulled(False, retries, f"{what} {digest}: a complete answer with the wrong bytes")
                why = f"{what} {digest}: {response.status_code} {response.text[:200]}"
            if attempt == RETRIES:
                return Pulled(False, retries, why)
            retries += 1
    return Pulled(True, retries)


async def pull_all(world: World, half_way: asyncio.Event) -> list[Pulled]:
    context = ssl.create_default_context(cafile=str(world.gateway.ca_path))
    limits = httpx.Limits(max_connections=PULLS, max_keepalive_connections=PULLS)
    done = 0

    async with httpx.AsyncClient(
        proxy=world.gateway.proxy_url, verify=context, limits=limits, follow_redirects=True, timeout=30
    ) as client:

        async def one() -> Pulled:
            nonlocal done
            try:
                result = await asyncio.wait_for(pull(client, world.image), PULL_DEADLINE)
            except TimeoutError:
                result = Pulled(False, 0, f"not done in {PULL_DEADLINE} s")
            done += 1
            if done >= PULLS // 2:
                half_way.set()
            return result

        return await asyncio.gather(*(one() for _ in range(PULLS)))


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_two_hundred_pulls_survive_the_first_mirror_dying_half_way(world: World) -> None:
    half_way = asyncio.Event()

    async def kill_a_half_way() -> None:
        await half_way.wait()
        await asyncio.to_thread(world.a.refuse)

    killer = asyncio.create_task(kill_a_half_way())
    results = await pull_all(world, half_way)
    await killer
    failed = Counter(r.why for r in results if not r.ok)
    assert not failed, f"{sum(failed.values())} of {PULLS} pulls failed: {failed.most_common(5)}"
    served_by_a = len(world.a.requests)
    served_by_b = [r for r in world.b.requests if r.method == "GET"]
    # Both mirrors had their share: A until it died, B after.
    assert served_by_a > 0 and served_by_b, (served_by_a, len(served_by_b))
    rss = rss_of(world.gateway.process.pid)
    assert rss < MAX_GATEWAY_RSS, f"the gateway holds {rss / 2**20:.0f} MiB after {PULLS} pulls"
    retried = sum(r.retries for r in results)
    print(f"{PULLS} pulls, {retried} blob transfers asked again, gateway RSS {rss / 2**20:.0f} MiB")
