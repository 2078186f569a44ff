import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ocigate.credentials import (
    ContainersAuth,
    Credential,
    CredentialChain,
    CredentialError,
    CredentialSource,
    DockerConfig,
    KubernetesSecrets,
    OcigateStore,
    run_credential_helper,
)
from tests.support.within import returns_within

# Every secret used below contains this marker, so one assertion can prove none of them leaked into a message.
MARK = "S3CRET"


async def lookup(source: CredentialSource, host: str, upstream: str, repository: str) -> Credential | None:
    """What `source` has for the host, upstream and repository, without where it found it."""
    found = await source.locate(host, upstream, repository)
    return found[0] if found else None


def secret(name: str) -> str:
    return f"{name}-{MARK}"


def basic(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def rewrite(path: Path, text: str) -> None:
    """Rewrites a file so that its change is seen even on file systems with coarse timestamps."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def docker_config(tmp_path: Path, document: object) -> DockerConfig:
    write_json(tmp_path / "docker" / "config.json", document)
    return DockerConfig(tmp_path / "docker", helper_timeout=0.5)


# --- Credential ---------------------------------------------------------------------------------------------------


def test_repr_redacts_every_secret():
    credential = Credential("bob", secret("pw"), secret("idt"), secret("rt"))
    assert MARK not in repr(credential)
    assert MARK not in str(credential)
    assert MARK not in f"{credential}"
    assert "bob" in repr(credential)
    assert "password=None" in repr(Credential("bob"))


def test_identity_is_stable_distinct_and_not_the_secret():
    a = Credential("bob", secret("pw"))
    assert a.identity() == Credential("bob", secret("pw")).identity()
    assert a.identity() != Credential("bob", secret("other")).identity()
    assert a.identity() != Credential("alice", secret("pw")).identity()
    assert a.identity() != Credential("bob", identity_token=secret("pw")).identity()
    assert MARK not in a.identity() and "pw" not in a.identity()


# --- docker config.json -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "registry.example:5000",
        "https://registry.example:5000",
        "http://registry.example:5000",
        "https://registry.example:5000/",
        "https://registry.example:5000/v1/",
        "registry.example:5000/",
    ],
)
async def test_docker_key_variants_with_port(tmp_path, key):
    source = docker_config(tmp_path, {"auths": {key: {"auth": basic("u", secret("p"))}}})
    assert await lookup(source, "registry.example:5000", "registry.example:5000", "team/app") == Credential(
        "u", secret("p")
    )
    assert await lookup(source, "registry.example", "registry.example", "team/app") is None
    assert await lookup(source, "registry.example:5001", "registry.example:5001", "team/app") is None


@pytest.mark.parametrize(
    "key", ["registry.example", "https://registry.example", "http://registry.example/", "registry.example:443"]
)
async def test_docker_key_variants_default_port(tmp_path, key):
    source = docker_config(tmp_path, {"auths": {key: {"username": "u", "password": secret("p")}}})
    for host in ("registry.example", "REGISTRY.example", "registry.example:443"):
        assert await lookup(source, host, "registry.example", "app") == Credential("u", secret("p"))
    assert await lookup(source, "other.example", "registry.example", "app") is None


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "docker.io", "index.docker.io", "https://registry-1.docker.io"]
)
@pytest.mark.parametrize("host", ["registry-1.docker.io", "docker.io", "index.docker.io"])
async def test_docker_hub_keys(tmp_path, key, host):
    source = docker_config(tmp_path, {"auths": {key: {"auth": basic("hubuser", secret("hub"))}}})
    assert await lookup(source, host, "docker.io", "library/alpine") == Credential("hubuser", secret("hub"))


async def test_docker_hub_legacy_key_wins_over_other_spellings(tmp_path):
    source = docker_config(
        tmp_path,
        {
            "auths": {
                "registry-1.docker.io": {"auth": basic("other", secret("x"))},
                "https://index.docker.io/v1/": {"auth": basic("legacy", secret("y"))},
            }
        },
    )
    # The spelling of the asked host wins first; among the other spellings, docker's own legacy key.
    assert (await lookup(source, "registry-1.docker.io", "docker.io", "a")).username == "other"
    assert (await lookup(source, "docker.io", "docker.io", "a")).username == "legacy"


async def test_docker_exact_host_spelling_wins(tmp_path):
    source = docker_config(
        tmp_path,
        {
            "auths": {
                "https://registry.example:443": {"auth": basic("with-port", secret("a"))},
                "registry.example": {"auth": basic("bare", secret("b"))},
            }
        },
    )
    assert (await lookup(source, "registry.example", "registry.example", "x")).username == "bare"
    assert (await lookup(source, "registry.example:443", "registry.example", "x")).username == "with-port"


async def test_docker_ignores_key_paths(tmp_path):
    # docker compares a key's host only; a path in a key narrows nothing.
    source = docker_config(tmp_path, {"auths": {"registry.example/team": {"auth": basic("u", secret("p"))}}})
    assert await lookup(source, "registry.example", "registry.example", "other/app") == Credential("u", secret("p"))


async def test_docker_tokens_and_entry_forms(tmp_path):
    source = docker_config(
        tmp_path,
        {
            "auths": {
                "idt.example": {"auth": basic("u", ""), "identitytoken": secret("refresh")},
                "idt2.example": {"identitytoken": secret("refresh2")},
                "rt.example": {"registrytoken": secret("bearer")},
                "both.example": {"auth": basic("from-auth", secret("a")), "username": "field", "password": "f"},
                "colon.example": {"auth": basic("u", "pa:ss:" + MARK)},
                "empty.example": {},
            }
        },
    )
    assert await lookup(source, "idt.example", "idt.example", "r") == Credential("u", None, secret("refresh"))
    assert await lookup(source, "idt2.example", "idt2.example", "r") == Credential(identity_token=secret("refresh2"))
    assert await lookup(source, "rt.example", "rt.example", "r") == Credential(registry_token=secret("bearer"))
    assert await lookup(source, "both.example", "both.example", "r") == Credential("from-auth", secret("a"))
    assert await lookup(source, "colon.example", "colon.example", "r") == Credential("u", "pa:ss:" + MARK)
    assert await lookup(source, "empty.example", "empty.example", "r") is None
    assert await lookup(source, "absent.example", "absent.example", "r") is None


@pytest.mark.parametrize("auth", ["!!!not-base64" + MARK, base64.b64encode(b"no-colon-" + MARK.encode()).decode()])
async def test_docker_invalid_auth_is_an_error_naming_the_file_not_the_secret(tmp_path, auth):
    source = docker_config(tmp_path, {"auths": {"bad.example": {"auth": auth}}})
    with pytest.raises(CredentialError) as raised:
        await lookup(source, "bad.example", "bad.example", "r")
    assert str(tmp_path / "docker" / "config.json") in str(raised.value)
    assert "bad.example" in str(raised.value)
    assert MARK not in str(raised.value) and auth not in str(raised.value)


async def test_missing_docker_config_has_no_credentials(tmp_path, caplog):
    assert await lookup(DockerConfig(tmp_path / "nowhere"), "a.example", "a.example", "r") is None
    assert caplog.records == []


def test_default_docker_config_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert DockerConfig().path == tmp_path / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DockerConfig().path == tmp_path / "home" / ".docker" / "config.json"


# --- credential helpers -------------------------------------------------------------------------------------------

HELPER = r"""#!/bin/sh
[ "$1" = get ] || { echo "unexpected arguments: $*" >&2; exit 2; }
url=$(cat)
echo "$url" >> "$(dirname "$0")/asked"
case "$url" in
  *found.example*|https://index.docker.io/v1/)
    printf '{"ServerURL": "%s", "Username": "helper-user", "Secret": "helper-S3CRET"}' "$url" ;;
  *token.example*) printf '{"ServerURL": "%s", "Username": "<token>", "Secret": "token-S3CRET"}' "$url" ;;
  *hang.example*) exec sleep 30 ;;
  *escape.example*) setsid sh -c 'echo $$ > "$0"; exec sleep 30' "$(dirname "$0")/escaped" & exec sleep 30 ;;
  *garbage.example*) echo "this is not json: helper-S3CRET" ;;
  *broken.example*) echo "half a helper-S3CRET" ; echo "backend unavailable, helper-S3CRET" >&2 ; exit 3 ;;
  *stderr-only.example*) echo "credentials not found in native keychain" >&2 ; exit 1 ;;
  *flood-stdout.example*) echo $$ > "$(dirname "$0")/pid" ; yes helper-S3CRET | head -c 4194304 ; exec sleep 30 ;;
  *flood-stderr.example*) echo $$ > "$(dirname "$0")/pid" ; yes helper-S3CRET | head -c 4194304 >&2 ; exec sleep 30 ;;
  *) echo "credentials not found in native keychain" ; exit 1 ;;
esac
"""


@pytest.fixture
def helper_dir(tmp_path, monkeypatch):
    directory = tmp_path / "bin"
    directory.mkdir()
    script = directory / "docker-credential-test"
    script.write_text(HELPER)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory


def asked(helper_dir: Path) -> list[str]:
    return (helper_dir / "asked").read_text().splitlines()


async def test_helper_get(helper_dir):
    assert await run_credential_helper("test", "found.example:5000") == Credential("helper-user", "helper-S3CRET")
    assert asked(helper_dir) == ["found.example:5000"]


async def test_helper_token_username_means_identity_token(helper_dir):
    assert await run_credential_helper("test", "token.example") == Credential(identity_token="token-S3CRET")


async def test_helper_not_found_is_none(helper_dir):
    assert await run_credential_helper("test", "unknown.example") is None
    assert await run_credential_helper("test", "stderr-only.example") is None  # said on stderr


async def test_helper_hang_is_killed_and_named(helper_dir):
    with pytest.raises(CredentialError, match=r"docker-credential-test did not answer within 0\.5 s"):
        await run_credential_helper("test", "hang.example", timeout=0.5)


async def test_a_hung_helper_whose_child_escaped_its_process_group_is_not_waited_for_long(helper_dir):
    # The escaped child keeps the helper's outputs open, so they never end.
    started = time.monotonic()
    try:
        with pytest.raises(CredentialError, match=r"docker-credential-test did not answer within 0\.5 s; killed"):
            await run_credential_helper("test", "escape.example", timeout=0.5)
        assert time.monotonic() - started < 0.5 + 5
    finally:
        # Ended by the test, and then the loop is given a moment to see the helper's outputs close.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int((helper_dir / "escaped").read_text()), signal.SIGKILL)
        await asyncio.sleep(0.2)


async def test_helper_garbage_and_failure_are_errors_without_the_secret(helper_dir):
    with pytest.raises(CredentialError, match="docker-credential-test answered with something that is not JSON") as e:
        await run_credential_helper("test", "garbage.example")
    assert MARK not in str(e.value)
    # Neither output is echoed: a helper may print a secret on stderr too.
    with pytest.raises(CredentialError, match=r"^credential helper docker-credential-test failed \(exit 3\)$") as e:
        await run_credential_helper("test", "broken.example")
    assert MARK not in str(e.value)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_a_helper_that_floods_an_output_is_cut_off_and_killed(helper_dir, stream):
    # 4 MiB, then it would sleep: only being killed ends it before the timeout.
    with pytest.raises(CredentialError) as e:
        await run_credential_helper("test", f"flood-{stream}.example", timeout=20)
    assert str(e.value) == f"credential helper docker-credential-test wrote more than 1024 KiB to {stream}; killed"
    with pytest.raises(ProcessLookupError):
        os.kill(int((helper_dir / "pid").read_text()), 0)


async def test_missing_helper_is_named(helper_dir):
    with pytest.raises(CredentialError, match="docker-credential-nosuchhelper is not on PATH"):
        await run_credential_helper("nosuchhelper", "found.example")


async def test_docker_cred_helpers_per_host(tmp_path, helper_dir):
    source = docker_config(tmp_path, {"credHelpers": {"found.example:5000": "test"}, "auths": {}})
    credential = await lookup(source, "found.example:5000", "found.example:5000", "r")
    assert credential == Credential("helper-user", "helper-S3CRET")
    assert asked(helper_dir) == ["found.example:5000"]
    # Another host has no helper and no auths entry.
    assert await lookup(source, "found.example:5001", "found.example:5001", "r") is None


async def test_docker_creds_store_for_every_host_with_hub_server_url(tmp_path, helper_dir):
    source = docker_config(
        tmp_path,
        {"credsStore": "test", "auths": {"fallback.example": {"auth": basic("file", secret("f"))}, "x.example": {}}},
    )
    assert await lookup(source, "registry-1.docker.io", "docker.io", "library/alpine") == Credential(
        "helper-user", "helper-S3CRET"
    )
    assert asked(helper_dir) == ["https://index.docker.io/v1/"]
    # The store has nothing: a real auths entry still counts, an empty one does not.
    assert await lookup(source, "fallback.example", "fallback.example", "r") == Credential("file", secret("f"))
    assert await lookup(source, "x.example", "x.example", "r") is None


async def test_chain_reports_the_helper_and_stops_on_its_error(tmp_path, helper_dir):
    docker = docker_config(tmp_path, {"credHelpers": {"hang.example": "test", "found.example": "test"}})
    later = ContainersAuth(write_json(tmp_path / "auth.json", {"auths": {"hang.example": {"auth": basic("u", "p")}}}))
    chain = CredentialChain([docker, later])
    credential, origin = await chain.lookup("found.example", "found.example", "r")
    assert credential.password == "helper-S3CRET"
    assert "docker-credential-test" in origin and str(docker.path) in origin
    with pytest.raises(CredentialError, match="docker-credential-test"):
        await chain.lookup("hang.example", "hang.example", "r")


# --- containers auth.json -----------------------------------------------------------------------------------------


async def test_containers_most_specific_key_wins(tmp_path):
    path = write_json(
        tmp_path / "auth.json",
        {
            "auths": {
                "registry.example": {"auth": basic("host", secret("1"))},
                "registry.example/team": {"auth": basic("namespace", secret("2"))},
                "registry.example/team/app": {"auth": basic("repository", secret("3"))},
                "registry.example/team/app/": {"auth": basic("dup-later", secret("4"))},
                "docker.io/library": {"auth": basic("hub-library", secret("5"))},
                "other.example/team": {"auth": basic("other-ns", secret("6"))},
            }
        },
    )
    source = ContainersAuth(path)

    async def user(host: str, repository: str) -> str | None:
        credential = await lookup(source, host, host, repository)
        return credential.username if credential else None

    assert await user("registry.example", "team/app") == "repository"
    assert await user("registry.example", "team/app/sub") == "repository"
    assert await user("registry.example", "team/application") == "namespace"  # whole segments only
    assert await user("registry.example", "team/other") == "namespace"
    assert await user("registry.example", "elsewhere/app") == "host"
    assert await user("registry-1.docker.io", "library/alpine") == "hub-library"
    assert await user("registry-1.docker.io", "someone/alpine") is None
    assert await user("other.example", "other/app") is None
    assert await user("other.example", "team/app") == "other-ns"


async def test_containers_legacy_url_key_is_host_wide(tmp_path):
    path = write_json(tmp_path / "auth.json", {"auths": {"https://index.docker.io/v1/": {"auth": basic("u", "p")}}})
    assert await lookup(ContainersAuth(path), "registry-1.docker.io", "docker.io", "any/repo") == Credential("u", "p")


# --- Kubernetes secrets -------------------------------------------------------------------------------------------


async def test_kubernetes_secret_directories(tmp_path):
    root = tmp_path / "secrets"
    write_json(root / "b-pull" / ".dockerconfigjson", {"auths": {"registry.example": {"auth": basic("b", "pb")}}})
    write_json(root / "a-pull" / ".dockerconfigjson", {"auths": {"registry.example": {"auth": basic("a", "pa")}}})
    write_json(root / ".dockerconfigjson", {"auths": {"top.example": {"username": "t", "password": "pt"}}})
    # The kubelet's atomic-writer directories hold copies; they must not be read twice (or first).
    write_json(root / "..data" / ".dockerconfigjson", {"auths": {"registry.example": {"auth": basic("x", "px")}}})
    # A secret names no helpers: they would let a secret run a program.
    write_json(root / "c-pull" / ".dockerconfigjson", {"credsStore": "test", "auths": {}})
    source = KubernetesSecrets(root)
    assert await lookup(source, "registry.example", "registry.example", "r") == Credential("a", "pa")
    assert await lookup(source, "top.example", "top.example", "r") == Credential("t", "pt")
    assert await lookup(source, "none.example", "none.example", "r") is None
    chain = CredentialChain([source])
    assert (await chain.lookup("registry.example", "registry.example", "r"))[1].startswith(
        f"kubernetes secret {root / 'a-pull' / '.dockerconfigjson'}"
    )
    # A secret mounted later is seen without a restart.
    write_json(root / "0-new" / ".dockerconfigjson", {"auths": {"registry.example": {"auth": basic("new", "pn")}}})
    assert await lookup(source, "registry.example", "registry.example", "r") == Credential("new", "pn")


async def test_kubernetes_missing_directory(tmp_path):
    assert await lookup(KubernetesSecrets(tmp_path / "absent"), "a", "a", "r") is None


# --- ocigate's own store ------------------------------------------------------------------------------------------


async def test_store_specificity(tmp_path):
    path = write_json(
        tmp_path / "credentials.json",
        [
            {"host": "mirror.example", "username": "host-only", "password": secret("1")},
            {"host": "mirror.example", "repository_prefix": "library", "username": "host-prefix", "password": "2"},
            {"host": "mirror.example", "upstream": "docker.io", "username": "host-upstream", "password": "3"},
            {
                "host": "mirror.example",
                "upstream": "docker.io",
                "repository_prefix": "library",
                "username": "upstream-prefix",
                "password": "4",
            },
            {
                "host": "mirror.example",
                "upstream": "docker.io",
                "repository_prefix": "library/alpine",
                "username": "upstream-longer-prefix",
                "password": "5",
            },
            {"host": "mirror.example", "upstream": "ghcr.io", "identity_token": secret("6")},
        ],
    )
    store = OcigateStore(path)

    async def user(upstream: str, repository: str) -> str | None:
        credential = await lookup(store, "mirror.example", upstream, repository)
        return credential.username if credential else None

    assert await user("docker.io", "library/alpine") == "upstream-longer-prefix"
    assert await user("docker.io", "library/alpine/sub") == "upstream-longer-prefix"
    assert await user("docker.io", "library/alpinex") == "upstream-prefix"
    assert await user("docker.io", "library/busybox") == "upstream-prefix"
    assert await user("docker.io", "someone/app") == "host-upstream"
    assert await user("quay.io", "library/app") == "host-prefix"
    assert await user("quay.io", "someone/app") == "host-only"
    assert await lookup(store, "mirror.example", "ghcr.io", "x/y") == Credential(identity_token=secret("6"))
    assert await lookup(store, "MIRROR.example", "quay.io", "a") == Credential("host-only", secret("1"))
    assert await lookup(store, "other.example", "docker.io", "library/alpine") is None


async def test_store_save_is_atomic_0600_and_replaces(tmp_path):
    path = tmp_path / "state" / "credentials.json"
    store = OcigateStore(path)
    store.save("mirror.example:5000", Credential("u", secret("first")), upstream="docker.io")
    store.save("mirror.example:5000", Credential(identity_token=secret("idt")))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.json"]  # no temporary left behind
    inode = path.stat().st_ino
    store.save("mirror.example:5000", Credential("u", secret("second")), upstream="DOCKER.IO")
    assert path.stat().st_ino != inode  # replaced, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == [
        {"host": "mirror.example:5000", "identity_token": secret("idt")},
        {"host": "mirror.example:5000", "upstream": "docker.io", "username": "u", "password": secret("second")},
    ]
    assert await lookup(store, "mirror.example:5000", "docker.io", "r") == Credential("u", secret("second"))
    assert await lookup(store, "mirror.example:5000", "quay.io", "r") == Credential(identity_token=secret("idt"))
    assert store.remove("mirror.example:5000", upstream="docker.io") is True
    assert store.remove("mirror.example:5000", upstream="docker.io") is False
    assert await lookup(store, "mirror.example:5000", "docker.io", "r") == Credential(identity_token=secret("idt"))
    with pytest.raises(CredentialError, match="needs a password or a token"):
        store.save("mirror.example:5000", Credential("only-a-name"))


def test_store_refuses_to_overwrite_a_malformed_file(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text('[{"host": "a", "password": "' + MARK + '"')
    with pytest.raises(CredentialError, match="not overwriting") as raised:
        OcigateStore(path).save("b", Credential("u", "p"))
    assert str(path) in str(raised.value) and MARK not in str(raised.value)
    assert path.read_text().endswith('"')


@pytest.mark.parametrize(
    "document",
    [
        {"host": "a", "password": "p"},
        [{"password": "p"}],
        [{"host": "a", "username": "u"}],
        [{"host": "a", "password": "p", "pasword": "typo"}],
        [{"host": "a", "password": 5}],
    ],
)
async def test_store_malformed_documents_are_rejected(tmp_path, caplog, document):
    path = write_json(tmp_path / "credentials.json", document)
    assert await lookup(OcigateStore(path), "a", "a", "r") is None
    assert len(caplog.records) == 1 and str(path) in caplog.text and "malformed" in caplog.text


# --- rotation and broken files ------------------------------------------------------------------------------------


async def test_rotation_is_seen_without_restart(tmp_path):
    docker = docker_config(tmp_path, {"auths": {"r.example": {"auth": basic("u", secret("old"))}}})
    assert (await lookup(docker, "r.example", "r.example", "x")).password == secret("old")
    rewrite(docker.path, json.dumps({"auths": {"r.example": {"auth": basic("u", secret("new"))}}}))
    assert (await lookup(docker, "r.example", "r.example", "x")).password == secret("new")
    # Replaced atomically (a new inode), as tools that write credentials do.
    replacement = docker.path.with_suffix(".new")
    replacement.write_text(json.dumps({"auths": {"r.example": {"auth": basic("u", secret("newer"))}}}))
    os.replace(replacement, docker.path)
    assert (await lookup(docker, "r.example", "r.example", "x")).password == secret("newer")
    # Removed: no credentials any more.
    docker.path.unlink()
    assert await lookup(docker, "r.example", "r.example", "x") is None


KINDS = ["docker", "containers", "store", "kubernetes"]


def file_source(tmp_path: Path, kind: str) -> tuple[Path, CredentialSource, Callable[[str], str]]:
    """A source of each kind, the file it reads, and the text of that file with one credential for r.example."""
    if kind == "store":
        path = tmp_path / "credentials.json"
        return (
            path,
            OcigateStore(path),
            lambda password: json.dumps([{"host": "r.example", "username": "u", "password": password}]),
        )
    path = {
        "docker": tmp_path / "docker" / "config.json",
        "containers": tmp_path / "auth.json",
        "kubernetes": tmp_path / "secrets" / "pull" / ".dockerconfigjson",
    }[kind]
    source = {"docker": DockerConfig, "containers": ContainersAuth, "kubernetes": KubernetesSecrets}[kind](
        {"docker": path.parent, "containers": path, "kubernetes": tmp_path / "secrets"}[kind]
    )
    return path, source, lambda password: json.dumps({"auths": {"r.example": {"auth": basic("u", password)}}})


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_rewrite_keeps_last_good_and_logs_once(tmp_path, caplog, kind):
    caplog.set_level(logging.WARNING, logger="ocigate")
    path, source, text = file_source(tmp_path, kind)
    write_json(path, [])
    rewrite(path, text(secret("good")))
    assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("good"))

    rewrite(path, text(secret("half-written"))[:-5])
    for _ in range(3):
        assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("good"))
    assert len(caplog.records) == 1
    assert str(path) in caplog.records[0].getMessage() and "malformed" in caplog.records[0].getMessage()

    # Broken differently: still the one line.
    rewrite(path, "\xff" + MARK)
    assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("good"))
    assert len(caplog.records) == 1

    # Recovered with a rotated password, then broken again: one more line, and the rotated one is kept.
    rewrite(path, text(secret("rotated")))
    assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("rotated"))
    rewrite(path, "{")
    assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("rotated"))
    assert len(caplog.records) == 2
    assert MARK not in caplog.text


def put_in_place_of(path: Path, thing: str) -> str:
    """Replaces the file at `path` with a FIFO, a directory or a symbolic link to itself; returns what the log says
    of it. (A chmod would not stop root, who runs the tests.)"""
    path.unlink()
    if thing == "fifo":
        os.mkfifo(path)
        return "is not a regular file but a FIFO"
    if thing == "directory":
        path.mkdir()
        return "is not a regular file but a directory"
    path.symlink_to(path.name)
    return "cannot be read (Too many levels of symbolic links)"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("thing", ["fifo", "directory", "symlink-loop"])
async def test_a_file_that_is_no_readable_regular_file_keeps_last_good_logs_once_and_never_blocks(
    tmp_path, caplog, kind, thing
):
    caplog.set_level(logging.WARNING, logger="ocigate")
    path, source, text = file_source(tmp_path, kind)
    write_json(path, [])
    path.write_text(text(secret("good")))
    assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("good"))
    problem = put_in_place_of(path, thing)
    for _ in range(3):
        # In a thread of its own: a read that blocks must fail the test, not hang the run.
        found = returns_within(5, lambda: asyncio.run(lookup(source, "r.example", "r.example", "x")))
        assert found == Credential("u", secret("good"))
    assert len(caplog.records) == 1
    assert f"{path} {problem}; keeping its last good contents" in caplog.records[0].getMessage()
    if thing == "directory":
        path.rmdir()
    else:
        path.unlink()
    path.write_text(text(secret("new")))
    assert await lookup(source, "r.example", "r.example", "x") == Credential("u", secret("new"))
    assert MARK not in caplog.text


def test_the_store_refuses_to_write_over_a_fifo_without_blocking(tmp_path):
    path = tmp_path / "credentials.json"
    os.mkfifo(path)
    with pytest.raises(CredentialError, match="is not a regular file but a FIFO; not overwriting it") as raised:
        returns_within(5, lambda: OcigateStore(path).save("b", Credential("u", secret("p"))))
    assert str(path) in str(raised.value)
    assert stat.S_ISFIFO(path.stat().st_mode)


# --- the chain ----------------------------------------------------------------------------------------------------


async def test_chain_first_source_with_a_credential_wins(tmp_path):
    store = OcigateStore(tmp_path / "credentials.json")
    store.save("mirror.example", Credential("store", secret("s")), upstream="docker.io")
    docker = docker_config(tmp_path, {"auths": {"mirror.example": {"auth": basic("docker", secret("d"))}}})
    chain = CredentialChain([store, docker])
    credential, origin = await chain.lookup("mirror.example", "docker.io", "library/alpine")
    assert credential.username == "store" and origin.startswith(f"ocigate credentials {store.path}")
    credential, origin = await chain.lookup("mirror.example", "quay.io", "app")
    assert credential.username == "docker" and origin == f"docker config {docker.path}: auths['mirror.example']"
    assert MARK not in origin
    assert await chain.lookup("nothing.example", "nothing.example", "app") is None


async def test_chain_does_not_replace_an_invalid_credential(tmp_path):
    docker = docker_config(tmp_path, {"auths": {"mirror.example": {"auth": "%%%" + MARK}}})
    auth = ContainersAuth(write_json(tmp_path / "auth.json", {"auths": {"mirror.example": {"auth": basic("u", "p")}}}))
    with pytest.raises(CredentialError) as raised:
        await CredentialChain([docker, auth]).lookup("mirror.example", "mirror.example", "app")
    assert str(docker.path) in str(raised.value) and MARK not in str(raised.value)


async def test_a_helpers_answer_is_used_for_a_while_and_a_failure_is_not_kept(tmp_path, helper_dir):
    source = docker_config(tmp_path, {"credHelpers": {"found.example": "test", "broken.example": "test"}})
    for _ in range(3):
        assert await lookup(source, "found.example", "found.example", "r") == Credential("helper-user", "helper-S3CRET")
    assert asked(helper_dir) == ["found.example"]
    for _ in range(2):
        with pytest.raises(CredentialError):
            await lookup(source, "broken.example", "broken.example", "r")
    assert asked(helper_dir) == ["found.example", "broken.example", "broken.example"]


async def test_requests_needing_a_helpers_answer_at_once_share_one_run(tmp_path, helper_dir):
    source = docker_config(tmp_path, {"credHelpers": {"found.example": "test"}})
    answers = await asyncio.gather(*(lookup(source, "found.example", "found.example", "r") for _ in range(10)))
    assert answers == [Credential("helper-user", "helper-S3CRET")] * 10
    assert asked(helper_dir) == ["found.example"]
