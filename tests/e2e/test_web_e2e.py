"""`ocigate web`: skopeo pulls through the gateway running with mitmweb's UI, and headless Chromium reads mitmweb's flow
list: each flow of the pull says what ocigate decided for it, and the failed one stands out. A token request mitmweb
holds mid-way shows none of its secrets anywhere mitmweb can show or give out a flow, neither while held nor once
answered. A person's replay in mitmweb's page (its `r` key) of a pull's manifest and blob GETs reaches the registry
with ocigate's real credential, never a placeholder, and mitmweb still shows no secret."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ocigate.credentials import Credential, OcigateStore
from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout, skopeo_inspect_raw
from tests.support.http_host import http_host
from tests.support.images import make_image, push_image
from tests.support.processes import wait_until
from tests.support.recorder import recording_proxy
from tests.support.registry import running_registry, write_htpasswd
from tests.support.secrets import forms, remember
from tests.support.web import artifact, headless_chromium, running_web_gateway
from tests.support.world import UPSTREAM, World

# What mitmweb shows of the mark ocigate puts on a failed flow (record.FAILED_MARK, ":x:").
FAILED = "❌"
REDACTED = "<redacted>"
_ROWS_TIMEOUT = 30.0


def _flow_list(page) -> list[dict[str, str]]:
    """Each row of mitmweb's flow list: its path, its comment and its mark."""
    return page.eval_on_selector_all(
        ".flow-table tbody tr",
        """rows => rows.map(row => ({
            path: row.querySelector('.col-path')?.innerText ?? '',
            comment: row.querySelector('.col-comment')?.innerText ?? '',
            marker: row.querySelector('.col-path .marker')?.innerText ?? '',
        }))""",
    )


def test_mitmweb_shows_the_pulls_flows_with_ocigates_comment_and_marks_the_failed_one(
    pull_world: World, tmp_path: Path
) -> None:
    world = pull_world
    host_map = {m.name: f"127.0.0.1:{m.recorder.port}" for m in (world.a, world.b)}
    with running_web_gateway(tmp_path / "gateway", world.workdir / "rules", host_map) as web:
        result, _ = skopeo_copy_to_layout(web.gateway, tmp_path / "pull", f"{UPSTREAM}/team/app:v1")
        assert result.returncode == 0, f"skopeo failed:\n{result.stderr.decode()}"
        missing = skopeo_inspect_raw(web.gateway, tmp_path / "missing", f"{UPSTREAM}/team/app:no-such-tag")
        assert missing.returncode != 0, "a tag no mirror has was pulled"

        with headless_chromium() as browser:
            page = browser.new_page(viewport={"width": 1800, "height": 1400})
            page.goto(web.page_url)
            deadline = time.monotonic() + _ROWS_TIMEOUT
            rows = _flow_list(page)
            # The flow list fills in after the page loads; the failed pull came last.
            while not any("manifest no-such-tag" in row["comment"] for row in rows):
                assert time.monotonic() < deadline, f"mitmweb's flow list never showed the failed pull: {rows}"
                time.sleep(0.2)
                rows = _flow_list(page)
            # The failed flow opened on its Comment tab: the whole comment, which the list's column cuts short.
            page.locator(".flow-table tbody tr", has_text="no-such-tag").first.click()
            page.locator(".flow-detail nav a", has_text="Comment").click()
            detail = page.locator(".flow-detail .kv-value").inner_text(timeout=10_000)
            screenshot = artifact("mitmweb-flow-list.png")
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot of mitmweb's flow list: {screenshot}")

    manifest = f"GET {UPSTREAM}/team/app manifest v1 -> mirror-b.test:5000 200 "
    served = [row for row in rows if row["comment"].startswith(manifest)]
    assert served, f"no flow list row says the manifest came from mirror B: {rows}"
    for row in served:
        assert "(skipped http://mirror-a.test:5000/v2: 404)" in row["comment"]
        assert row["comment"].endswith(f"; ns={UPSTREAM}; OCI-Named-Ref {UPSTREAM}/team/app:v1")
        assert row["marker"] == ""
    for blob in (world.app.config, *world.app.layers):
        said = [
            row
            for row in rows
            if f"GET {UPSTREAM}/team/app blob {blob.digest} -> mirror-b.test:5000 200" in row["comment"]
        ]
        assert said, f"no flow list row for blob {blob.digest}: {rows}"
        assert all(row["comment"].endswith(f"; verified {blob.digest}") and not row["marker"] for row in said)

    assert detail.startswith(f"GET {UPSTREAM}/team/app manifest no-such-tag -> gateway 404 (tried "), detail
    assert "http://mirror-a.test:5000/v2: 404; http://mirror-b.test:5000/v2: 404" in detail
    failed = [
        row for row in rows if f"{UPSTREAM}/team/app manifest no-such-tag -> gateway 404 (tried " in row["comment"]
    ]
    assert failed and all(row["marker"] == FAILED for row in failed), rows
    # Only failures are marked.
    assert all(row["marker"] == "" for row in rows if " 200" in row["comment"].partition(";")[0]), rows


# What a client hands the token endpoint it asks through `ocigate web`, and what it is issued.
FORM_PASSWORD = "web-form-password-0461"
REFRESH_TOKEN = "web-refresh-token-0462"
QUERY_TOKEN = "web-query-token-0463"
BASIC_PASSWORD = "web-basic-password-0464"
COOKIE = "web-session-cookie-0465"
ISSUED_TOKEN = "web-issued-token-0466"
SET_COOKIE = "web-set-cookie-0467"
remember(FORM_PASSWORD, REFRESH_TOKEN, QUERY_TOKEN, BASIC_PASSWORD, COOKIE, ISSUED_TOKEN, SET_COOKIE)
SECRETS = [
    FORM_PASSWORD,
    REFRESH_TOKEN,
    QUERY_TOKEN,
    BASIC_PASSWORD,
    base64.b64encode(f"alice:{BASIC_PASSWORD}".encode()).decode(),
    COOKIE,
    ISSUED_TOKEN,
    SET_COOKIE,
]
_HELD_TIMEOUT = 30.0

# mitmweb's API, called from its page as its own frontend calls it: with its session cookie and XSRF token.
_FETCH = """async ([method, url, body]) => {
    const xsrf = (document.cookie.match(/_mitmproxy_xsrf=([^;]+)/) || [])[1] || "";
    const response = await fetch(url, {
        method,
        headers: {"X-XSRFToken": xsrf, "Content-Type": "application/json"},
        body: body === null ? undefined : body,
    });
    return [response.status, Array.from(new Uint8Array(await response.arrayBuffer()))];
}"""


def _api(page, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    status, data = page.evaluate(_FETCH, [method, path, None if body is None else json.dumps(body)])
    return status, bytes(data)


def _token_flow(page) -> dict:
    status, data = _api(page, "GET", "/flows")
    assert status == 200, data
    return next((f for f in json.loads(data) if f["request"]["path"].startswith("/token")), {})


def _revealed(page, flow_id: str, har: Path) -> dict[str, bytes]:
    """Everything mitmweb gives out about the flow: its list, its dump, each message's content and content view,
    every export format, a HAR of all flows, its log events, and the page as rendered."""
    seen = {}
    for path in (
        "/flows",
        "/flows/dump",
        "/events",
        f"/flows/{flow_id}/request/content.data",
        f"/flows/{flow_id}/response/content.data",
        f"/flows/{flow_id}/request/content/auto.json",
        f"/flows/{flow_id}/response/content/auto.json",
        f"/flows/{flow_id}/request/content/raw.json",
    ):
        seen[path] = _api(page, "GET", path)[1]
    for export in ("curl", "httpie", "raw", "raw_request", "raw_response"):
        seen[f"export {export}"] = _api(page, "POST", "/commands/export", {"arguments": [export, f"@{flow_id}"]})[1]
    status, said = _api(page, "POST", "/commands/save.har", {"arguments": ["@all", str(har)]})
    assert status == 200 and har.exists(), said
    seen["save.har"] = har.read_bytes()
    seen["page"] = page.content().encode()
    seen["page's text"] = page.inner_text("body").encode()
    return seen


def _assert_nowhere(seen: dict[str, bytes], when: str, secrets: list[str] = SECRETS) -> None:
    for where, data in seen.items():
        for secret in secrets:
            for form in forms(secret):
                assert form not in data, f"{when}, mitmweb's {where} holds {secret!r} (as {form!r})"


def test_mitmweb_reveals_no_secret_of_a_flow_held_mid_way_nor_once_it_is_resumed(tmp_path: Path) -> None:
    received: list[tuple[str, bytes, str]] = []

    def token_endpoint(handler) -> tuple[int, bytes, dict[str, str]]:
        received.append((handler.path, handler.body, handler.headers["Authorization"]))
        body = json.dumps({"access_token": ISSUED_TOKEN, "expires_in": 60}).encode()
        return 200, body, {"Content-Type": "application/json", "Set-Cookie": f"session={SET_COOKIE}; Path=/"}

    rules = tmp_path / "rules"
    (rules / "unused.test:5000").mkdir(parents=True)  # the token endpoint is no ruled upstream: it passes through
    (rules / "unused.test:5000" / "hosts.toml").write_text('server = "http://unused.test:5000"\n')
    form = f"grant_type=password&username=alice&password={FORM_PASSWORD}&refresh_token={REFRESH_TOKEN}".encode()
    with http_host(token_endpoint) as (port, _):
        realm = f"http://realm.test:{port}/token?service=registry&access_token={QUERY_TOKEN}"
        host_map = {f"realm.test:{port}": f"127.0.0.1:{port}"}
        # mitmweb holds the OAuth POST at its request hook, where its body is known, until the test resumes it.
        options = ("intercept=~u /token",)
        with (
            running_web_gateway(tmp_path / "gateway", rules, host_map, options) as web,
            ThreadPoolExecutor(1) as client,
            headless_chromium() as browser,
        ):
            answer = client.submit(_post_token, web.gateway.proxy_url, realm, form)
            page = browser.new_page(viewport={"width": 1800, "height": 1400})
            page.goto(web.page_url)
            deadline = time.monotonic() + _HELD_TIMEOUT
            while not (flow := _token_flow(page)).get("intercepted"):
                assert time.monotonic() < deadline, f"mitmweb never held the token request:\n{web.gateway.log_text()}"
                time.sleep(0.2)
            assert not received and not answer.done()  # held: the host has heard nothing yet
            page.locator(".flow-table tbody tr", has_text="/token").first.click()
            page.locator(".flow-detail nav a", has_text="Request").click()
            page.locator(".flow-detail", has_text="grant_type").wait_for(timeout=10_000)
            held = _revealed(page, flow["id"], tmp_path / "held.har")
            screenshot = artifact("mitmweb-held-token-request.png")
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot of mitmweb holding the token request: {screenshot}")

            status, said = _api(page, "POST", f"/flows/{flow['id']}/resume")
            assert status == 200, said
            response = answer.result(timeout=_HELD_TIMEOUT)
            while not (flow := _token_flow(page)).get("response"):
                assert time.monotonic() < deadline + _HELD_TIMEOUT, "mitmweb never showed the answer"
                time.sleep(0.2)
            page.locator(".flow-detail nav a", has_text="Response").click()
            page.locator(".flow-detail", has_text="expires_in").wait_for(timeout=10_000)
            after = _revealed(page, flow["id"], tmp_path / "after.har")

    _assert_nowhere(held, "while the flow was held")
    _assert_nowhere(after, "once the flow was answered")
    # The redacted forms are what mitmweb shows instead.
    assert (
        f"password: {REDACTED}".encode() in held["page's text"]
        and f"access_token={REDACTED}".encode() in held["/flows"]
    )
    assert b'"access_token": "<redacted>"' in after[f"/flows/{flow['id']}/response/content.data"]
    # The client got its answer whole, and the host the request as the client sent it.
    assert response.status_code == 200 and response.json()["access_token"] == ISSUED_TOKEN
    assert response.headers["Set-Cookie"] == f"session={SET_COOKIE}; Path=/"
    basic = "Basic " + base64.b64encode(f"alice:{BASIC_PASSWORD}".encode()).decode()
    assert received == [(f"/token?service=registry&access_token={QUERY_TOKEN}", form, basic)]


def _post_token(proxy: str, realm: str, form: bytes) -> httpx.Response:
    with httpx.Client(proxy=proxy, trust_env=False, timeout=_HELD_TIMEOUT * 3) as client:
        return client.post(
            realm,
            content=form,
            auth=("alice", BASIC_PASSWORD),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"session={COOKIE}"},
        )


REPLAY_PASSWORD = "web-replay-password-0468"
remember(REPLAY_PASSWORD)
_REPLAY_TIMEOUT = 60.0


def _replayed(page, path: str) -> dict:
    """The GET of `path` as mitmweb's /flows has it once replayed and answered again, else {}."""
    status, data = _api(page, "GET", "/flows")
    assert status == 200, data
    flows = [f for f in json.loads(data) if f["request"]["method"] == "GET" and f["request"]["path"] == path]
    return next((f for f in flows if f.get("is_replay") == "request" and f.get("response")), {})


def test_a_flow_replayed_in_mitmwebs_page_reaches_the_registry_with_ocigates_credential_and_shows_no_secret(
    tmp_path: Path,
) -> None:
    image = make_image("web-replay", layers=1)
    blob = image.layers[0].digest
    upstream = "registry.test:5000"
    basic_credential = "Basic " + base64.b64encode(f"bob:{REPLAY_PASSWORD}".encode()).decode()
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"bob": REPLAY_PASSWORD})
    with running_registry(tmp_path / "registry", htpasswd=htpasswd) as registry, recording_proxy(registry.url) as front:
        with httpx.Client(auth=("bob", REPLAY_PASSWORD)) as pushing:
            push_image(registry.url, "team/app", "v1", image, client=pushing)
        # The registry itself is the ruled upstream: a blob's flow, re-pointed at its host, is still for a ruled
        # upstream when replayed (see test_replay_e2e.py).
        rules = tmp_path / "rules"
        (rules / upstream).mkdir(parents=True)
        (rules / upstream / "hosts.toml").write_text(f'server = "http://{upstream}"\n')
        gateway_dir = tmp_path / "gateway"
        OcigateStore(gateway_dir / "ocigate-credentials.json").save(upstream, Credential("bob", REPLAY_PASSWORD))
        with running_web_gateway(gateway_dir, rules, {upstream: f"127.0.0.1:{front.port}"}) as web:
            result, layout = skopeo_copy_to_layout(web.gateway, tmp_path / "pull", f"{upstream}/team/app:v1")
            assert result.returncode == 0, f"skopeo failed:\n{result.stderr.decode()}\n{web.gateway.log_text()}"
            assert_layout_holds(layout, image)
            front.clear()
            with headless_chromium() as browser:
                page = browser.new_page(viewport={"width": 1800, "height": 1400})
                page.goto(web.page_url)
                replayed = {}
                for path in ("/v2/team/app/manifests/v1", f"/v2/team/app/blobs/{blob}"):
                    row = page.locator(".flow-table tbody tr").filter(has_text=path).filter(has_text="GET").first
                    row.click(timeout=_REPLAY_TIMEOUT * 1000)
                    assert not _replayed(page, path)
                    # mitmweb's own shortcut for its Replay button, on the flow the person selected.
                    page.keyboard.press("r")
                    wait_until(
                        lambda path=path: bool(_replayed(page, path)),
                        _REPLAY_TIMEOUT,
                        lambda why, path=path: f"mitmweb never replayed {path} ({why}):\n{web.gateway.log_text()}",
                        interval=0.2,
                    )
                    replayed[path] = _replayed(page, path)
                page.locator(".flow-table tbody tr").filter(has_text=f"/blobs/{blob}").first.click()
                screenshot = artifact("mitmweb-replayed-flows.png")
                page.screenshot(path=str(screenshot), full_page=True)
                print(f"screenshot of mitmweb after its replay of a manifest and a blob: {screenshot}")
                blob_id = replayed[f"/v2/team/app/blobs/{blob}"]["id"]
                seen = _revealed(page, blob_id, tmp_path / "replayed.har")

    # The replays succeeded: the registry answered each with what was asked for.
    assert all(flow["response"]["status_code"] == 200 for flow in replayed.values()), replayed
    asked = {(request.method, request.path): request for request in front.requests}
    for path in replayed:
        request = asked.get(("GET", path))
        assert request is not None, f"the registry's front never got the replayed GET {path}: {front.requests}"
        # ocigate's own credential, the real one: what mitmweb shows in its place is never sent.
        assert request.header_values("Authorization") == [basic_credential], (path, request.headers)
    for request in front.requests:
        assert REDACTED not in request.target, request.target
        for name, value in request.headers:
            assert REDACTED not in value, (request.target, name, value)
    _assert_nowhere(seen, "after the replay", [REPLAY_PASSWORD, basic_credential.removeprefix("Basic ")])
