"""The token-server fixture against the real docker-registry (distribution 2.8) configured for token auth."""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.registry import Registry, running_registry
from tests.support.token_server import TokenRequest, TokenServer, running_token_server

ACCOUNTS = {"alice": "alice-secret", "bob": "bob-secret"}
ACCESS = {
    "alice": {"team/*": ["pull", "push"]},
    "bob": {},
    None: {"public/*": ["pull"]},
}
TIMEOUT = 10.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path / "token", ACCOUNTS, access=ACCESS) as started:
        yield started


@pytest.fixture
def registry(tmp_path: Path, server: TokenServer) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", extra_config=server.registry_auth_config()) as started:
        yield started


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as started:
        yield started


def get_token(
    client: httpx.Client,
    server: TokenServer,
    scopes: list[str],
    auth: tuple[str, str] | None = None,
) -> httpx.Response:
    params = [("service", server.service), *(("scope", scope) for scope in scopes)]
    return client.get(server.realm, params=params, auth=auth)


def registry_get(client: httpx.Client, registry: Registry, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get(f"{registry.url}{path}", headers=headers)


def test_registry_challenges_with_the_servers_realm_and_service(
    server: TokenServer, registry: Registry, client: httpx.Client
) -> None:
    response = registry_get(client, registry, "/v2/")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == f'Bearer realm="{server.realm}",service="{server.service}"'

    response = registry_get(client, registry, "/v2/team/app/tags/list")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="{server.realm}",service="{server.service}",scope="repository:team/app:pull"'
    )
    assert server.requests == []


def test_basic_get_token_opens_the_registry_within_its_access(
    server: TokenServer, registry: Registry, client: httpx.Client
) -> None:
    response = get_token(client, server, [], auth=("alice", "alice-secret"))
    assert response.status_code == 200
    document = response.json()
    assert document["token"] == document["access_token"]
    assert document["expires_in"] == 300
    assert isinstance(document["expires_in"], int)  # Go clients unmarshal it into an int
    assert document["issued_at"].endswith("Z")
    assert "refresh_token" not in document
    assert registry_get(client, registry, "/v2/", document["token"]).status_code == 200

    pull = get_token(client, server, ["repository:team/app:pull"], auth=("alice", "alice-secret")).json()["token"]
    tags = registry_get(client, registry, "/v2/team/app/tags/list", pull)
    assert tags.status_code == 404
    assert tags.json()["errors"][0]["code"] == "NAME_UNKNOWN"

    # The same token does not cover a repository it was not issued for, even one alice may read.
    other = registry_get(client, registry, "/v2/team/other/tags/list", pull)
    assert other.status_code == 401
    assert 'error="insufficient_scope"' in other.headers["WWW-Authenticate"]

    assert server.requests == [
        TokenRequest("GET", "/token", "alice", server.service, (), None, None, 200, ()),
        TokenRequest(
            "GET",
            "/token",
            "alice",
            server.service,
            ("repository:team/app:pull",),
            None,
            None,
            200,
            ("repository:team/app:pull",),
        ),
    ]


def test_token_grants_only_the_intersection_of_requested_and_allowed_actions(
    server: TokenServer, client: httpx.Client
) -> None:
    scopes = ["repository:team/app:pull,push,delete", "repository:other/app:pull", "registry:catalog:*"]
    response = get_token(client, server, scopes, auth=("alice", "alice-secret"))
    assert response.status_code == 200
    (record,) = server.requests
    assert record.scopes == tuple(scopes)
    assert record.granted == ("repository:team/app:pull,push",)
    assert _claims(response.json()["token"])["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}
    ]


def test_account_without_access_gets_an_empty_token_the_registry_refuses(
    server: TokenServer, registry: Registry, client: httpx.Client
) -> None:
    response = get_token(client, server, ["repository:team/app:pull"], auth=("bob", "bob-secret"))
    assert response.status_code == 200
    token = response.json()["token"]
    assert _claims(token)["access"] == []
    assert _claims(token)["sub"] == "bob"

    refused = registry_get(client, registry, "/v2/team/app/tags/list", token)
    assert refused.status_code == 401
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    # /v2/ needs no access, only a valid token.
    assert registry_get(client, registry, "/v2/", token).status_code == 200
    assert [(r.account, r.status, r.granted) for r in server.requests] == [("bob", 200, ())]


def test_wrong_password_is_refused_and_recorded(server: TokenServer, client: httpx.Client) -> None:
    response = get_token(client, server, ["repository:team/app:pull"], auth=("alice", "wrong"))
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"

    unknown = get_token(client, server, [], auth=("mallory", "alice-secret"))
    assert unknown.status_code == 401

    bearer = client.get(server.realm, params={"service": server.service}, headers={"Authorization": "Bearer x"})
    assert bearer.status_code == 401

    assert [(r.method, r.account, r.scopes, r.status) for r in server.requests] == [
        ("GET", "alice", ("repository:team/app:pull",), 401),
        ("GET", "mallory", (), 401),
        ("GET", None, (), 401),
    ]


def test_anonymous_gets_only_what_access_none_allows(
    server: TokenServer, registry: Registry, client: httpx.Client
) -> None:
    public = get_token(client, server, ["repository:public/app:pull,push"])
    assert public.status_code == 200
    public_token = public.json()["token"]
    assert _claims(public_token)["sub"] == ""
    assert registry_get(client, registry, "/v2/public/app/tags/list", public_token).status_code == 404

    team = get_token(client, server, ["repository:team/app:pull"])
    assert team.status_code == 200
    assert registry_get(client, registry, "/v2/team/app/tags/list", team.json()["token"]).status_code == 401

    assert [(r.account, r.scopes, r.granted) for r in server.requests] == [
        (None, ("repository:public/app:pull,push",), ("repository:public/app:pull",)),
        (None, ("repository:team/app:pull",), ()),
    ]


def test_oauth_password_and_refresh_token_grants(server: TokenServer, registry: Registry, client: httpx.Client) -> None:
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": "alice-secret",
        "service": server.service,
        "client_id": "ocigate-test",
        "access_type": "offline",
        "scope": "repository:team/app:pull repository:team/lib:pull",
    }
    response = client.post(server.realm, data=form)
    assert response.status_code == 200
    document = response.json()
    assert document["access_token"] == document["token"]
    refresh_token = document["refresh_token"]
    assert server.identity_tokens[refresh_token] == "alice"
    tags = registry_get(client, registry, "/v2/team/lib/tags/list", document["access_token"])
    assert tags.status_code == 404

    without_offline = client.post(server.realm, data={**form, "access_type": ""})
    assert without_offline.status_code == 200
    assert "refresh_token" not in without_offline.json()

    refreshed = client.post(
        server.realm,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "service": server.service,
            "client_id": "ocigate-test",
            "scope": "repository:team/app:pull",
        },
    )
    assert refreshed.status_code == 200
    assert registry_get(client, registry, "/v2/team/app/tags/list", refreshed.json()["access_token"]).status_code == 404

    bad_password = client.post(server.realm, data={**form, "password": "wrong"})
    assert bad_password.status_code == 401
    assert bad_password.json()["error"] == "invalid_grant"
    unknown_refresh = client.post(
        server.realm, data={"grant_type": "refresh_token", "refresh_token": "nope", "service": server.service}
    )
    assert unknown_refresh.status_code == 401
    no_grant = client.post(server.realm, data={"service": server.service})
    assert no_grant.status_code == 400

    assert [(r.method, r.grant_type, r.account, r.client_id, r.status) for r in server.requests] == [
        ("POST", "password", "alice", "ocigate-test", 200),
        ("POST", "password", "alice", "ocigate-test", 200),
        ("POST", "refresh_token", "alice", "ocigate-test", 200),
        ("POST", "password", "alice", "ocigate-test", 401),
        ("POST", "refresh_token", None, None, 401),
        ("POST", None, None, None, 400),
    ]
    assert server.requests[0].scopes == ("repository:team/app:pull", "repository:team/lib:pull")


def test_identity_tokens_argument_and_get_offline_token(tmp_path: Path, client: httpx.Client) -> None:
    with running_token_server(tmp_path, ACCOUNTS, access=ACCESS, identity_tokens={"given": "bob"}) as server:
        response = client.post(
            server.realm, data={"grant_type": "refresh_token", "refresh_token": "given", "service": server.service}
        )
        assert response.status_code == 200
        assert _claims(response.json()["access_token"])["sub"] == "bob"

        offline = client.get(
            server.realm, params={"service": server.service, "offline_token": "true"}, auth=("alice", "alice-secret")
        )
        assert server.identity_tokens[offline.json()["refresh_token"]] == "alice"


def test_oauth_post_false_answers_404_and_get_still_works(tmp_path: Path, client: httpx.Client) -> None:
    with running_token_server(tmp_path, ACCOUNTS, access=ACCESS, oauth_post=False) as server:
        form = {"grant_type": "password", "username": "alice", "password": "alice-secret", "service": server.service}
        assert client.post(server.realm, data=form).status_code == 404
        assert get_token(client, server, [], auth=("alice", "alice-secret")).status_code == 200
        assert [(r.method, r.grant_type, r.status) for r in server.requests] == [
            ("POST", "password", 404),
            ("GET", None, 200),
        ]
        server.clear()
        assert server.requests == []


def test_short_lifetime_is_enforced_by_the_registry_despite_its_leeway(
    server: TokenServer, registry: Registry, client: httpx.Client
) -> None:
    server.lifetime = 1.0
    response = get_token(client, server, ["repository:team/app:pull"], auth=("alice", "alice-secret"))
    document = response.json()
    assert document["expires_in"] == 1
    token = document["token"]
    issued = datetime.datetime.fromisoformat(document["issued_at"]).timestamp()
    # distribution refuses a token only when now > exp + 60 s (whole seconds).
    refused_after = _claims(token)["exp"] + 60
    assert issued + 1.0 <= refused_after < issued + 2.0
    assert registry_get(client, registry, "/v2/team/app/tags/list", token).status_code == 404
    time.sleep(max(0.0, refused_after + 0.05 - time.time()))
    expired = registry_get(client, registry, "/v2/team/app/tags/list", token)
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


def test_registry_refuses_tokens_from_another_signer_issuer_or_audience(
    tmp_path: Path, server: TokenServer, registry: Registry, client: httpx.Client
) -> None:
    access = server.grant("alice", ["repository:team/app:pull"])
    assert registry_get(client, registry, "/v2/team/app/tags/list", server.mint("alice", access)).status_code == 404
    for token in (server.mint("alice", access, issuer="someone-else"), server.mint("alice", access, audience="x")):
        assert registry_get(client, registry, "/v2/team/app/tags/list", token).status_code == 401
    with running_token_server(tmp_path / "other", ACCOUNTS) as other:
        foreign = other.mint("alice", access)
        refused = registry_get(client, registry, "/v2/team/app/tags/list", foreign)
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]


def test_server_stops_on_exit(tmp_path: Path, client: httpx.Client) -> None:
    with running_token_server(tmp_path, ACCOUNTS) as server:
        realm = server.realm
        assert client.get(realm).status_code == 200
        assert client.get(f"{server.url}/elsewhere").status_code == 404
        assert [(r.path, r.status) for r in server.requests] == [("/token", 200), ("/elsewhere", 404)]
    with pytest.raises(httpx.TransportError):
        client.get(realm)


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
