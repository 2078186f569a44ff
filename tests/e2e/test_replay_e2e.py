"""mitmproxy's client replay of a capture the gateway wrote: the capture holds `<redacted>` where each secret was, and
a replayed flow goes through the gateway's HTTP layer (askagain.Playback). The real gateway replays (`client_replay`,
as `mitmdump -C`) a manifest it read whole and a blob it streamed, against a real registry behind a recorder: no host
is sent a placeholder."""

import hashlib
import subprocess
from pathlib import Path

import httpx
from mitmproxy import io

from ocigate.credentials import Credential, OcigateStore
from tests.support.gateway import Gateway, running_gateway
from tests.support.images import make_image, push_image
from tests.support.processes import wait_until
from tests.support.recorder import recording_proxy
from tests.support.registry import running_registry
from tests.support.secrets import remember
from tests.support.token_server import running_token_server

MIRROR_KEY = "mirror-key-secret-for-replay-tests"
CLIENT_TOKEN = "client-token-secret-for-replay-tests"
ALICE_PASSWORD = "alice-password-for-replay-tests"
remember(MIRROR_KEY, CLIENT_TOKEN, ALICE_PASSWORD)


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


def test_a_replayed_blob_download_goes_with_the_gateways_token_and_keeps_it(tmp_path: Path) -> None:
    """A blob GET the gateway streams, replayed: sent through the gateway's HTTP layer with the token it holds for
    the mirror (not the placeholder its flow shows), answered 200 with the blob, and the token still cached after."""
    image = make_image("replayed-token-app", layers=1)
    blob = image.layers[0].digest
    access = {"alice": {"team/*": ["pull"]}, "pusher": {"team/*": ["pull", "push"]}}
    with (
        running_token_server(tmp_path / "tokens", {"alice": ALICE_PASSWORD}, access=access) as tokens,
        running_registry(tmp_path / "registry", extra_config=tokens.registry_auth_config()) as registry,
        recording_proxy(registry.url) as mirror,
    ):
        pusher = tokens.mint("pusher", [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}])
        with httpx.Client(headers={"Authorization": f"Bearer {pusher}"}) as client:
            push_image(registry.url, "team/app", "v1", image, client=client)
        rules = tmp_path / "rules"
        # The registry itself is the ruled upstream: a flow's capture names it as the host, which a replay then is for.
        (rules / "registry.test:5000").mkdir(parents=True)
        (rules / "registry.test:5000" / "hosts.toml").write_text('server = "http://registry.test:5000"\n')
        host_map = {"registry.test:5000": f"127.0.0.1:{mirror.port}"}
        for workdir in (tmp_path / "gateway", tmp_path / "replay"):
            OcigateStore(workdir / "ocigate-credentials.json").save(
                "registry.test:5000", Credential("alice", ALICE_PASSWORD)
            )
        capture = tmp_path / "capture.flows"
        # Twice: the first download is where the gateway gets its token, the second goes with it.
        with running_gateway(tmp_path / "gateway", rules, host_map, [f"save_stream_file={capture}"]) as gateway:
            downloads = [_curl(gateway, f"http://registry.test:5000/v2/team/app/blobs/{blob}") for _ in range(2)]
        assert all(download.returncode == 0 for download in downloads), [d.stderr for d in downloads]
        with capture.open("rb") as file:
            captured = [
                (flow.request.path, flow.response and flow.response.status_code)
                for flow in io.FlowReader(file).stream()
            ]
        mirror.clear()
        tokens.clear()
        replayed = tmp_path / "replayed.flows"
        options = [f"client_replay={capture}", f"save_stream_file={replayed}", "store_streamed_bodies=true"]
        with running_gateway(tmp_path / "replay", rules, host_map, options) as replaying:
            wait_until(
                lambda: len(mirror.requests) >= len(captured),
                60,
                lambda why: f"the replay did not reach the mirror ({why}):\n{replaying.log_text()[-3000:]}",
            )
            # The token the replay got is still the gateway's: a download after it needs no other.
            again = _curl(replaying, f"http://registry.test:5000/v2/team/app/blobs/{blob}")
            assert again.returncode == 0, (again.stderr, replaying.log_text()[-3000:])
            assert hashlib.sha256(again.stdout).hexdigest() == blob.removeprefix("sha256:")
    assert [(r.account, r.status) for r in tokens.requests] == [("alice", 200)]
    for request in mirror.requests:
        for name, value in request.headers:
            assert "<redacted>" not in value, (request.target, name, value)
    assert all(request.header_values("Authorization") for request in mirror.requests[1:]), mirror.requests
    with replayed.open("rb") as file:
        flows = [flow for flow in io.FlowReader(file).stream() if flow.is_replay == "request"]
    assert [(flow.request.path, flow.response and flow.response.status_code) for flow in flows] == captured
    for flow in flows:
        assert flow.response is not None
        assert hashlib.sha256(flow.response.content or b"").hexdigest() == blob.removeprefix("sha256:")
