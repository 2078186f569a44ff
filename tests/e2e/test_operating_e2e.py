"""The access log and the metrics of a real pull: skopeo pulls through a real gateway whose first mirror is down and
whose second does not have the image, with a proxy user; the access log has a line for each request it made, saying
what happened, and the metrics, scraped while it pulled and after, moved as the pull did. Neither holds a secret."""

import base64
import json
import subprocess
import threading
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import assert_layout_holds, client_env
from tests.support.gateway import running_gateway
from tests.support.hoststoml import write_mirror_rules
from tests.support.registry import free_port, write_htpasswd
from tests.support.secrets import remember
from tests.support.world import UPSTREAM, World

USER, PASSWORD = "puller", "proxy-password-of-the-operating-test"
remember(PASSWORD)
DOWN = "http://down.test:5000"  # nothing listens there
REFERENCE = f"{UPSTREAM}/team/app:v1"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, found), value in samples.items() if n == name and wanted <= found)


class Scraper(threading.Thread):
    """Scrapes the metrics over and over while the pull runs."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.seen: list[Samples] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.seen.append(scrape(self.port))


def test_the_access_log_and_metrics_reflect_a_pull_with_a_fallback(pull_world: World, tmp_path: Path) -> None:
    a, b, image = pull_world.a, pull_world.b, pull_world.app
    rules = write_mirror_rules(tmp_path / "rules", UPSTREAM, [DOWN, f"http://{a.name}", f"http://{b.name}"])
    host_map = {"down.test:5000": f"127.0.0.1:{free_port()}"} | {m.name: f"127.0.0.1:{m.recorder.port}" for m in (a, b)}
    access_log, metrics_port = tmp_path / "access.log", free_port()
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    options = [f"ocigate_access_log={access_log}", f"ocigate_metrics={metrics_port}", f"proxyauth=@{htpasswd}"]
    with running_gateway(tmp_path / "gateway", rules, host_map, options) as gateway:
        before = scrape(metrics_port)
        home = tmp_path / "client"
        env = client_env(gateway, home)
        proxy = gateway.proxy_url.replace("http://", f"http://{USER}:{PASSWORD}@")
        env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy)
        layout = home / "layout"
        command = ["skopeo", "copy", "--src-cert-dir", str(gateway.cert_dir(home))]
        scraper = Scraper(metrics_port)
        scraper.start()
        try:
            pulled = subprocess.run(
                [*command, f"docker://{REFERENCE}", f"oci:{layout}:copied"], env=env, capture_output=True, timeout=180
            )
        finally:
            scraper.stop.set()
            scraper.join()
        after = scrape(metrics_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            metrics_text = answer.read().decode()
        gateway_log = gateway.log_text()
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert_layout_holds(layout, image)

    # The access log (flushed when the gateway ended): one line for each request the gateway handled.
    logged = [json.loads(text) for text in access_log.read_text().splitlines()]
    mirror_a, mirror_b, down = f"http://{a.name}/v2", f"http://{b.name}/v2", f"{DOWN}/v2"
    for line in logged:
        assert line["upstream"] == UPSTREAM and line["proxy_user"] == USER, line
        assert line["client"].startswith("127.0.0.1:") and line["ms"] >= 0 and line["time"].endswith("Z"), line
    manifests = [line for line in logged if line["kind"] == "manifest" and line["method"] == "GET"]
    assert manifests, logged
    manifest = manifests[0]
    assert manifest["reference"] == REFERENCE and manifest["status"] == 200
    assert manifest["served_by"] == mirror_b and manifest["bytes"] == image.manifest.size
    assert [(h["host"], h["skipped"], h["reason"]) for h in manifest["hosts"]] == [
        (down, True, "unreachable"),
        (mirror_a, True, "not_found"),
        (mirror_b, False, None),
    ]
    blobs = {line["reference"].rpartition("@")[2]: line for line in logged if line["kind"] == "blob"}
    expected = {blob.digest: blob for blob in (image.config, *image.layers)}
    assert blobs.keys() == expected.keys()
    for digest, line in blobs.items():
        assert (line["served_by"], line["status"], line["verified"]) == (mirror_b, 200, digest), line
        assert line["bytes"] == expected[digest].size, line
        # Asked first of the host that served their manifest, which has them.
        assert line["hosts"] == [], line

    # The metrics moved as the pull did: requests by kind, bytes by host, fallbacks by reason.
    assert total(before, "ocigate_requests_total") == 0
    assert total(after, "ocigate_requests_total") == len(logged)
    for kind, count in Counter(line["kind"] for line in logged).items():
        assert total(after, "ocigate_requests_total", upstream=UPSTREAM, kind=kind) == count, kind
        assert total(after, "ocigate_request_duration_seconds_count", kind=kind) == count, kind
    served_by_b = sum(line["bytes"] for line in logged if line["served_by"] == mirror_b)
    assert served_by_b >= sum(blob.size for blob in expected.values()) + image.manifest.size
    assert total(after, "ocigate_response_bytes_total", host=mirror_b) == served_by_b
    assert total(after, "ocigate_fallbacks_total", host=down, reason="unreachable") == 1
    passed_over = Counter((h["host"], h["reason"]) for line in logged for h in line["hosts"] if h["skipped"])
    assert passed_over[(mirror_a, "not_found")] >= 1
    for (host, reason), count in passed_over.items():
        assert total(after, "ocigate_fallbacks_total", upstream=UPSTREAM, host=host, reason=reason) == count
    assert total(after, "ocigate_fallbacks_total") == passed_over.total()
    assert total(after, "ocigate_verification_failures_total") == 0
    assert total(after, "ocigate_host_cooling_down", host=down) == 1
    assert total(after, "ocigate_host_cooling_down", host=mirror_b) == 0
    # The tagged manifest's pull was remembered for its blobs; ocigate's own client asked the mirrors.
    assert total(after, "ocigate_cache_entries", cache="pull_contexts") > 0
    assert total(after, "ocigate_cache_entries", cache="host_clients") > 0
    # Scraped while the pull ran: never going back.
    assert scraper.seen, "no scrape finished while skopeo pulled"
    counts = [total(seen, "ocigate_requests_total") for seen in [before, *scraper.seen, after]]
    assert counts == sorted(counts)

    # No secret: not the proxy password, not its Basic form.
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (access_log.read_text(), metrics_text, gateway_log):
        assert PASSWORD not in text and basic not in text
    assert "Authorization" not in access_log.read_text()
