"""`ocigate login` / `ocigate logout`: a login is tried against the host's /v2/ (with ns= for a mirror) before it is
stored, nothing is stored when the host refuses it, and the secret never shows up in what the command prints."""

import base64
import io
import json
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocigate import cli, hoststoml, login
from ocigate.credentials import Credential, OcigateStore, StoreEntry
from ocigate.routes import DEFAULT_PORTS, DOCKER_HUB_ALIASES, DOCKER_HUB_SERVER
from tests.support.http_host import http_host

USER, PASSWORD = "alice", "s3cret-Pa55"
BASIC_ARGS = ("-u", USER, "--password-stdin", "--credentials")
GOOD_BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def basic_registry(handler: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
    if handler.path.startswith("/v2/") and handler.headers.get("Authorization") == GOOD_BASIC:
        return 200, b"{}", {"Docker-Distribution-API-Version": "registry/2.0"}
    return 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": 'Basic realm="mirror"'}


def run_login(monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: str = f"{PASSWORD}\n") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return login.main(["login", *argv])


def test_login_is_verified_with_ns_and_stored_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "creds" / "credentials.json"
    with http_host(basic_registry) as (port, seen):
        code = run_login(
            monkeypatch,
            [
                *("--namespace", "Docker.io", "--repository", "/library/", "-u", USER, "--password-stdin"),
                *("--credentials", str(store), "--map-host", f"mirror.test=127.0.0.1:{port}"),
                f"http://mirror.test:{port}",
            ],
        )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == (
        f"Login succeeded: mirror.test:{port} (namespace docker.io, repository prefix library) saved in {store}\n"
    )
    assert err == ""
    assert OcigateStore(store).entries() == (
        StoreEntry(f"mirror.test:{port}", Credential(USER, PASSWORD), "docker.io", "library"),
    )
    assert store.stat().st_mode & 0o777 == 0o600
    # The gateway's own ping of a mirror: GET /v2/?ns=..., Host the mirror's name, then again with the credential.
    assert [(method, path) for method, path, _ in seen] == [("GET", "/v2/?ns=docker.io")] * 2
    assert "authorization" not in seen[0][2]
    assert seen[1][2]["authorization"] == GOOD_BASIC
    assert seen[1][2]["host"] == f"mirror.test:{port}"


def test_wrong_password_stores_nothing_and_never_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"
    wrong = "wrong-Secret-42"
    with http_host(basic_registry) as (port, seen):
        code = run_login(
            monkeypatch,
            [
                *("--namespace", "docker.io", "-u", USER, "--password-stdin", "--credentials", str(store)),
                *("--map-host", f"mirror.test=127.0.0.1:{port}", f"http://mirror.test:{port}"),
            ],
            stdin=wrong + "\n",
        )
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err == f"ocigate login: mirror.test:{port} refused the credential of '{USER}' (HTTP 401)\n"
    assert wrong not in out + err
    assert not store.exists()
    # It was tried, not refused before asking.
    assert any(h.get("authorization", "").startswith("Basic ") for _, _, h in seen)


def test_login_to_the_registry_itself_sends_no_ns_and_stores_no_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"
    answers: list[str] = []

    def prompt_input(prompt: str) -> str:
        answers.append(prompt)
        return USER

    def prompt_secret(prompt: str = "") -> str:
        answers.append(prompt)
        return PASSWORD

    monkeypatch.setattr("builtins.input", prompt_input)
    monkeypatch.setattr(login.getpass, "getpass", prompt_secret)
    with http_host(basic_registry) as (port, seen):
        code = login.main(
            [
                *("login", "--credentials", str(store)),
                *("--map-host", f"registry.test=127.0.0.1:{port}", f"http://registry.test:{port}/"),
            ]
        )
    assert code == 0, capsys.readouterr().err
    assert answers == ["Username: ", "Password: "]
    assert {path for _, path, _ in seen} == {"/v2/"}
    assert OcigateStore(store).entries() == (StoreEntry(f"registry.test:{port}", Credential(USER, PASSWORD)),)


def test_identity_token_is_exchanged_at_the_token_realm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"
    refresh_token = "refresh-Token-7"
    realm = {}

    def bearer_registry(handler: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        if handler.path == "/token":
            form = parse_qs(handler.body.decode())
            if form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == [refresh_token]:
                return 200, json.dumps({"access_token": "access-1", "expires_in": 300}).encode(), {}
            return 401, b"{}", {}
        if handler.headers.get("Authorization") == "Bearer access-1":
            return 200, b"{}", {}
        return 401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm["url"]}",service="mirror"'}

    with http_host(bearer_registry) as (port, seen):
        realm["url"] = f"http://auth.test:{port}/token"
        code = run_login(
            monkeypatch,
            [
                *("--identity-token", "--password-stdin", "--credentials", str(store)),
                *("--map-host", f"mirror.test=127.0.0.1:{port}", "--map-host", f"auth.test=127.0.0.1:{port}"),
                *("--namespace", "ghcr.io", f"http://mirror.test:{port}"),
            ],
            stdin=refresh_token,
        )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert refresh_token not in out + err
    assert ("POST", "/token") in [(m, p) for m, p, _ in seen]
    assert OcigateStore(store).entries() == (
        StoreEntry(f"mirror.test:{port}", Credential(identity_token=refresh_token), "ghcr.io"),
    )


def test_refused_token_fails_naming_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"

    def refusing_realm(handler: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        if handler.path.startswith("/token"):
            return 401, b"{}", {}
        return 401, b"", {"WWW-Authenticate": f'Bearer realm="http://127.0.0.1:{handler.server.server_port}/token"'}

    with http_host(refusing_realm) as (port, _):
        code = run_login(monkeypatch, [*BASIC_ARGS, str(store), f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"ocigate login: no token for 127.0.0.1:{port} with the credential of '{USER}' from stdin")
    assert PASSWORD not in err
    assert not store.exists()


def test_open_host_is_stored_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"
    with http_host(lambda handler: (200, b"{}")) as (port, _):
        code = run_login(
            monkeypatch, ["-u", USER, "--password-stdin", "--credentials", str(store), f"http://127.0.0.1:{port}"]
        )
    out, err = capsys.readouterr()
    assert code == 0
    assert "without asking for credentials, so the login could not be verified" in err
    assert out.startswith(f"Login succeeded: 127.0.0.1:{port} saved in")
    assert [e.host for e in OcigateStore(store).entries()] == [f"127.0.0.1:{port}"]


def test_unreachable_host_fails_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"
    with http_host(basic_registry) as (port, _):
        pass  # closed again: nothing listens on the port any more
    code = run_login(
        monkeypatch,
        [*BASIC_ARGS, str(store), "--map-host", f"gone.test=127.0.0.1:{port}", f"http://gone.test:{port}"],
    )
    assert code == 1
    assert capsys.readouterr().err == f"ocigate login: gone.test:{port}: connection refused\n"
    assert not store.exists()


def test_not_a_registry_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.json"
    with http_host(lambda handler: (404, b"not found")) as (port, _):
        code = run_login(monkeypatch, [*BASIC_ARGS, str(store), f"http://127.0.0.1:{port}"])
    assert code == 1
    assert "answered HTTP 404 to GET /v2/; is it a registry?" in capsys.readouterr().err
    assert not store.exists()


@pytest.mark.parametrize(
    "argv", [["-p", PASSWORD], [f"-p{PASSWORD}"], ["--password", PASSWORD], [f"--password={PASSWORD}"]]
)
def test_secret_as_an_argument_is_refused_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        login.main(["login", "-u", USER, *argv, "--credentials", str(tmp_path / "c.json"), "registry.test"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "never taken from an argument" in err
    assert PASSWORD not in out + err
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    ("text", "url", "key"),
    [
        ("Mirror.Test", "https://mirror.test/v2", "mirror.test"),
        ("https://mirror.test:443/", "https://mirror.test/v2", "mirror.test"),
        ("mirror.test:5000", "https://mirror.test:5000/v2", "mirror.test:5000"),
        ("http://mirror.test", "http://mirror.test/v2", "mirror.test"),
        ("http://mirror.test:443", "http://mirror.test:443/v2", "mirror.test:443"),
        ("https://art.test/api/docker/hub", "https://art.test/api/docker/hub/v2", "art.test"),
        ("[::1]:5000", "https://[::1]:5000/v2", "[::1]:5000"),
        # The gateway asks Docker Hub's registry host, so that is whose credential a Docker Hub login is.
        ("docker.io", "https://registry-1.docker.io/v2", "registry-1.docker.io"),
        ("index.docker.io", "https://registry-1.docker.io/v2", "registry-1.docker.io"),
    ],
)
def test_host_key_is_the_gateways_netloc(text: str, url: str, key: str) -> None:
    host = login.parse_host(text)
    assert (host.url, host.netloc) == (url, key)


@pytest.mark.parametrize("text", ["ftp://mirror.test", "https://u:p@mirror.test", "mirror.test/v2/?x=1", "bad host"])
def test_bad_host_is_a_usage_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST|invalid"):
        login.parse_host(text)


def test_a_host_no_image_names_needs_a_namespace() -> None:
    host = login.parse_host("my_mirror.test:5000")
    assert host.netloc == "my_mirror.test:5000"
    with pytest.raises(ValueError, match="give --namespace"):
        login.upstream_of(host)


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: everything but printable ASCII escaped."""
    escaped = (c if c.isascii() and c.isprintable() and c not in '"\\' else f"\\U{ord(c):08X}" for c in text)
    return '"' + "".join(escaped) + '"'


URL_PIECES = [
    *("https://", "http://", "HTTPS://", "ftp://", "//", "://"),
    *("mirror", ".test", ".", "-", "_", "Docker.io", "index.docker.io", "registry-1.docker.io", "1.2.3.4"),
    *("[::1]", "[0:0::1]", "[fe80::1%25eth0]", "[", "]", "::1"),
    *(":", ":443", ":80", ":0", ":5000", ":99999", ":x"),
    *("/", "/v2", "/v2/", "/api/docker", "/..", "//x", "%2F"),
    *("?", "?x=1", "#", "@", "u:p@", " ", "\t", "\n", "é"),
]
well_formed_urls = st.builds(
    lambda *parts: "".join(parts),
    st.sampled_from(["", "https://", "http://", "HTTP://"]),
    st.one_of(
        st.from_regex(r"[A-Za-z0-9_-]{1,8}(\.[A-Za-z0-9_-]{1,8}){0,2}\.?", fullmatch=True),
        st.sampled_from(["[::1]", "[0:0::1]", "1.2.3.4", "docker.io", "Index.Docker.IO", "registry-1.docker.io"]),
    ),
    st.sampled_from(["", ":443", ":80", ":5000", ":0", ":", ":65536"]),
    st.from_regex(r"(/[a-z0-9.]{0,4}){0,3}/?", fullmatch=True),
)
host_texts = st.one_of(
    well_formed_urls,
    st.lists(st.sampled_from(URL_PIECES), max_size=8).map("".join),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=24),
)


@settings(max_examples=400, deadline=None)
@given(host_texts)
def test_login_takes_exactly_the_host_urls_hosts_toml_takes(text: str) -> None:
    path = Path("/rules/registry.test/hosts.toml")
    try:
        login_host = login.parse_host(text)
    except ValueError:
        login_host = None
    for document in (f"[host.{toml_string(text)}]\n", f"server = {toml_string(text)}\n"):
        try:
            toml_host = hoststoml._parse_hosts_file(document, path).hosts_for("registry.test")[0]
        except hoststoml.RulesError:
            toml_host = None
        assert (login_host is None) == (toml_host is None), document
        if login_host is None or toml_host is None:
            continue
        # The one difference: a login to Docker Hub is for the host the gateway asks for Docker Hub's images.
        docker_hub = toml_host.scheme == "https" and toml_host.port == DEFAULT_PORTS["https"]
        hostname = DOCKER_HUB_SERVER if docker_hub and toml_host.host in DOCKER_HUB_ALIASES else toml_host.host
        expected = (toml_host.scheme, hostname, toml_host.port, toml_host.path)
        assert (login_host.scheme, login_host.host, login_host.port, login_host.path) == expected


def test_logout_removes_exactly_that_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "credentials.json"
    store = OcigateStore(path)
    store.save("mirror.test:5000", Credential(USER, "one"))
    store.save("mirror.test:5000", Credential(USER, "two"), "docker.io")
    store.save("mirror.test:5000", Credential(USER, "three"), "docker.io", "library")
    store.save("other.test", Credential(USER, "four"), "docker.io")

    code = login.main(["logout", "--namespace", "docker.io", "--credentials", str(path), "mirror.test:5000"])
    assert code == 0
    assert capsys.readouterr().out == f"Removed mirror.test:5000 (namespace docker.io) from {path}\n"
    assert [(e.host, e.upstream, e.repository_prefix, e.credential.password) for e in store.entries()] == [
        ("mirror.test:5000", None, None, "one"),
        ("mirror.test:5000", "docker.io", "library", "three"),
        ("other.test", "docker.io", None, "four"),
    ]
    assert path.stat().st_mode & 0o777 == 0o600

    again = login.main(["logout", "--namespace", "docker.io", "--credentials", str(path), "mirror.test:5000"])
    err = capsys.readouterr().err
    assert again == 1
    assert err.startswith(f"ocigate logout: no credential stored for mirror.test:5000 (namespace docker.io) in {path}")
    assert "stored for: mirror.test:5000; mirror.test:5000 (namespace docker.io, repository prefix library)" in err
    assert "one" not in err and "three" not in err
    assert len(store.entries()) == 3


def test_cli_dispatches_login_and_logout_before_mitmdump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["logout", "--credentials", str(tmp_path / "none.json"), "mirror.test"])
    assert exit_info.value.code == 1
    assert "ocigate logout: no credential stored for mirror.test" in capsys.readouterr().err
