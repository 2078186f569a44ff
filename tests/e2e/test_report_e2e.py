"""`ocigate report` on a real capture: skopeo pulls through the real gateway, which authenticates with a password to
two mirrors of one registry; the first answers 500 for the manifest, the second serves. The gateway saves the pull
with `save_stream_file`; then the `ocigate` command reports on that file, as text and as a page, naming the failing
mirror and the fallback, with a waterfall, and without the password."""

import base64
import subprocess
import sys
from pathlib import Path

import httpx

from ocigate.credentials import Credential, OcigateStore
from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout
from tests.support.faulty_host import Shape, running_faulty_host
from tests.support.gateway import running_gateway
from tests.support.hoststoml import write_mirror_rules
from tests.support.images import make_image, push_image
from tests.support.recorder import recording_proxy
from tests.support.registry import running_registry, write_htpasswd
from tests.support.secrets import remember

UPSTREAM = "upstream.test"
REFERENCE = f"{UPSTREAM}/team/app:v1"
FAULTY, GOOD = "faulty.test:5000", "good.test:5000"
USER, PASSWORD = "reporter", "report-password-for-tests"
remember(PASSWORD)
# The installed command, as a person runs it.
OCIGATE = str(Path(sys.executable).parent / "ocigate")


def test_the_report_of_a_captured_pull_names_the_failing_mirror_and_the_fallback(tmp_path: Path) -> None:
    image = make_image("report-app", layers=3)
    gateway_dir = tmp_path / "gateway"
    capture = gateway_dir / "capture.flows"
    with (
        running_registry(tmp_path / "registry", htpasswd=write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})) as r,
        running_faulty_host(r.url) as faulty,
        recording_proxy(r.url) as good,
    ):
        with httpx.Client(auth=(USER, PASSWORD)) as client:
            push_image(r.url, "team/app", "v1", image, client=client)
        rules = write_mirror_rules(tmp_path / "rules", UPSTREAM, [f"http://{FAULTY}", f"http://{GOOD}"])
        for host in (FAULTY, GOOD):
            OcigateStore(gateway_dir / "ocigate-credentials.json").save(host, Credential(USER, PASSWORD))
        faulty.shape("v1", Shape(status=500))
        host_map = {FAULTY: f"127.0.0.1:{faulty.port}", GOOD: f"127.0.0.1:{good.port}"}
        with running_gateway(gateway_dir, rules, host_map, [f"save_stream_file={capture}"]) as gateway:
            result, layout = skopeo_copy_to_layout(gateway, tmp_path / "client", REFERENCE)
            log = gateway.log_text()
        assert result.returncode == 0, f"{result.stderr.decode()}\n{log[-3000:]}"
        assert_layout_holds(layout, image)
        assert faulty.served("shape") >= 1
        assert any(request.path.startswith("/v2/team/app/blobs/") for request in good.requests)

    page = tmp_path / "report.html"
    reported = subprocess.run(
        [OCIGATE, "report", str(capture), "--html", str(page)], capture_output=True, text=True, timeout=60
    )
    assert reported.returncode == 0, reported.stderr
    text = reported.stdout
    # The capture's URLs of the mirrors, as ocigate recorded them.
    faulty_url, good_url = next(
        (line.split("fallback: ")[1].split(" (500) -> ")[0], line.split(" -> ")[1].split(": ")[0])
        for line in text.splitlines()
        if line.strip().startswith("fallback:")
    )
    assert faulty_url.startswith(f"http://{FAULTY}") and good_url.startswith(f"http://{GOOD}")
    assert f"Pull {REFERENCE}\n" in text
    assert f"host {faulty_url}: asked 1, served 0, did not serve: 500 x1" in text
    assert f"fallback: {faulty_url} (500) -> {good_url}: 1 request" in text
    assert f"GET manifest v1 -> {good_url} 200" in text
    # The config and every layer came from the good mirror, and the pull's bytes are theirs at least.
    blobs = [line for line in text.splitlines() if " GET blob sha256:" in line]
    assert len(blobs) == 4 and all(f"-> {good_url} 200" in line for line in blobs), text
    assert ", 0 failed" in text

    html = page.read_text()
    assert '<svg class="waterfall"' in html
    assert f"{faulty_url}: served 0, did not serve 1" in html
    failed_bar = html.index('<g class="bar failed">')
    assert "GET manifest v1" in html[failed_bar : html.index("</g>", failed_bar)]
    assert "<script" not in html

    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for output in (text, reported.stderr, html):
        assert PASSWORD not in output and basic not in output
