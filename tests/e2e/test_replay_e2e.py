"""mitmproxy's client replay of a capture the gateway wrote: the capture holds `<redacted>` where each secret was, and
a replayed flow goes through mitmproxy's own HTTP layer. The real gateway replays (`client_replay`, as `mitmdump -C`)
a manifest it read whole and a blob it streamed, against a real registry behind a recorder: no host is sent a
placeholder."""

import subprocess
from pathlib import Path

from mitmproxy import io

from tests.support.gateway import Gateway, running_gateway
from tests.support.images import make_image, push_image
from tests.support.processes import wait_until
from tests.support.recorder import recording_proxy
from tests.support.registry import running_registry
from tests.support.secrets import remember

MIRROR_KEY = "mirror-key-secret-for-replay-tests"
CLIENT_TOKEN = "client-token-secret-for-replay-tests"
remember(MIRROR_KEY, CLIENT_TOKEN)


def _curl(gateway: Gateway, url: str, *headers: str) -> subprocess.CompletedProcess[bytes]:
    ca = gateway.confdir / "mitmproxy-ca-cert.pem"
    arguments = [argument for header in headers for argument in ("-H", header)]
    command = ["curl", "-sS", "-f", "--noproxy", "", "-x", gateway.proxy_url, "--cacert", str(ca), *arguments, url]
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


def test_a_replayed_capture_sends_no_host_a_redaction_placeholder(tmp_path: Path) -> None:
    image = make_image("replayed-app", layers=1)
    blob = image.layers[0].digest
    with running_registry(tmp_path / "registry") as registry, recording_proxy(registry.url) as mirror:
        push_image(registry.url, "team/app", "v1", image)
        rules = tmp_path / "rules"
        (rules / "upstream.test").mkdir(parents=True)
        (rules / "upstream.test" / "hosts.toml").write_text(
            f'offline = true\n[host."http://mirror.test:5000"]\n  [host."http://mirror.test:5000".header]\n'
            f'    X-Mirror-Key = "{MIRROR_KEY}"\n'
        )
        host_map = {"mirror.test:5000": f"127.0.0.1:{mirror.port}"}
        capture = tmp_path / "capture.flows"
        with running_gateway(tmp_path / "gateway", rules, host_map, [f"save_stream_file={capture}"]) as gateway:
            manifest = _curl(
                gateway,
                "https://upstream.test/v2/team/app/manifests/v1",
                f"Authorization: Bearer {CLIENT_TOKEN}",
                f"Cookie: session={CLIENT_TOKEN}",
                "Accept: application/vnd.oci.image.manifest.v1+json",
            )
            layer = _curl(gateway, f"https://upstream.test/v2/team/app/blobs/{blob}")
        assert manifest.returncode == 0 and layer.returncode == 0, (manifest.stderr, layer.stderr)
        with capture.open("rb") as file:
            captured = list(io.FlowReader(file).stream())
        held = [value for flow in captured for _, value in flow.request.headers.items(multi=True)]
        assert sum("<redacted>" in value for value in held) >= 3, held  # the placeholders a replay starts from
        mirror.clear()
        options = [f"client_replay={capture}"]
        with running_gateway(tmp_path / "replay", rules, host_map, options) as replaying:
            wait_until(
                lambda: (
                    {request.path for request in mirror.requests}
                    >= {"/v2/team/app/manifests/v1", f"/v2/team/app/blobs/{blob}"}
                ),
                60,
                lambda why: f"the replay did not reach the mirror ({why}):\n{replaying.log_text()[-3000:]}",
            )
    assert mirror.requests
    for request in mirror.requests:
        for name, value in request.headers:
            assert "<redacted>" not in value, (request.target, name, value)
        # The gateway's own key goes with each request ocigate sends; the client's token and cookie go nowhere.
        assert CLIENT_TOKEN not in repr(request.headers)
