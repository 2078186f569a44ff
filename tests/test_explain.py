"""`ocigate explain IMAGE`: the planner's decisions for an image's manifest, each host's reason, URL, headers and
credential (by source and key), said without contacting any host or running a credential helper."""

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocigate.credentials import CredentialChain, DockerConfig, Finding, OcigateStore
from ocigate.explain import Image, explain, parse_image, policy_refusal, render
from ocigate.hoststoml import load_rules
from ocigate.policy import load_policy
from ocigate.routes import RouteError
from tests.test_check import PASSWORD, run
from tests.test_hoststoml import activated_examples, write_hosts

DIGEST = "sha256:" + "a" * 64


def no_credential(host: str, upstream: str, repository: str) -> list[Finding]:
    return []


def explained(tree: Path, reference: str, *, push: bool = False, find=no_credential) -> str:  # type: ignore[no-untyped-def]
    image = parse_image(reference)
    rule = load_rules(tree).lookup(image.upstream)
    return render(
        explain(
            image,
            rule,
            push=push,
            user=None,
            rules=tree,
            named_ref_headers=("OCI-Named-Ref",),
            find_credential=find,
        )
    )


@pytest.mark.parametrize(
    ("text", "image"),
    [
        ("alpine", Image("docker.io", "library/alpine", "latest", None)),
        ("team/app:v1", Image("docker.io", "team/app", "v1", None)),
        ("index.docker.io/alpine:3", Image("docker.io", "library/alpine", "3", None)),
        ("ghcr.io/team/app:v1", Image("ghcr.io", "team/app", "v1", None)),
        (f"localhost:5000/app@{DIGEST}", Image("localhost:5000", "app", None, DIGEST)),
        (f"registry.example/app:v1@{DIGEST}", Image("registry.example", "app", "v1", DIGEST)),
    ],
)
def test_image_references_are_read_as_docker_reads_them(text: str, image: Image) -> None:
    assert parse_image(text) == image


@pytest.mark.parametrize("text", ["", "Alpine", "alpine:", "alpine@sha256:12", "ghcr.io/", "a b"])
def test_what_is_no_image_reference_is_an_error(text: str) -> None:
    with pytest.raises(RouteError):
        parse_image(text)


@given(
    upstream=st.sampled_from(["ghcr.io", "registry.example:5000", "localhost:5000", "docker.io"]),
    # A repository name is at most 255 characters (routes.validate_repository), as distribution says.
    repository=st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)*/[a-z0-9]+", fullmatch=True).filter(lambda r: len(r) <= 255),
    tag=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True),
)
def test_a_named_reference_reads_back_as_itself(upstream: str, repository: str, tag: str) -> None:
    image = Image(upstream, repository, tag, None)
    assert parse_image(str(image)) == image


def test_a_tag_goes_to_the_hosts_that_may_resolve_with_ns_and_the_named_reference(tmp_path: Path) -> None:
    out = explained(activated_examples(tmp_path), "alpine:3.20")
    assert out.startswith("docker.io/library/alpine:3.20 (pull)\nrule: ")
    assert "/docker.io/hosts.toml\n" in out
    assert "  1. https://mirror-a.example/v2 [pull, resolve]\n     asked first: it may resolve a tag" in out
    assert "     GET https://mirror-a.example/v2/library/alpine/manifests/3.20?ns=docker.io\n" in out
    assert "       OCI-Named-Ref: docker.io/library/alpine:3.20\n" in out
    assert "  2. https://mirror-b.example/v2 [pull]\n     not asked: lacks resolve" in out
    # The registry itself gets no ns= (containerd's rule).
    assert "     GET https://registry-1.docker.io/v2/library/alpine/manifests/3.20\n" in out
    assert "credential: none: anonymous" in out


def test_a_digest_goes_to_every_host_with_pull(tmp_path: Path) -> None:
    out = explained(activated_examples(tmp_path), f"alpine@{DIGEST}")
    assert f"GET https://mirror-b.example/v2/library/alpine/manifests/{DIGEST}?ns=docker.io" in out
    assert "not asked" not in out


def test_mirror_keys_and_a_push_are_explained(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "upstream.test",
        "offline = true\n"
        '[host."https://harbor.test"]\n  repository_prefix = "proxy"\n  pull_from_mirror = "digest-only"\n'
        f'  [host."https://harbor.test".header]\n    x-token = "{PASSWORD}"\n'
        '[host."https://other.test"]\n  capabilities = ["pull", "resolve", "push"]\n'
        '[host."https://third.test"]\n  capabilities = ["push"]\n',
    )
    by_tag = explained(tmp_path, "upstream.test/team/app:v1")
    assert "offline = true: only the mirrors are contacted" in by_tag
    assert 'not asked: pull_from_mirror = "digest-only" and this is a pull by tag' in by_tag
    by_digest = explained(tmp_path, f"upstream.test/team/app@{DIGEST}")
    assert f"GET https://harbor.test/v2/proxy/team/app/manifests/{DIGEST}?ns=upstream.test" in by_digest
    assert "x-token: (from hosts.toml, value not shown)" in by_digest
    assert PASSWORD not in by_digest
    push = explained(tmp_path, "upstream.test/team/app:v1", push=True)
    # The first host with push (every capability, as none is listed), under its repository prefix.
    assert "PUT https://harbor.test/v2/proxy/team/app/manifests/v1?ns=upstream.test" in push
    assert "2. https://other.test/v2 [pull, resolve, push]\n     not asked: a push goes to one host only" in push
    assert "3. https://third.test/v2 [push]\n     not asked: a push goes to one host only" in push


def test_each_host_gets_the_credential_its_sources_would_give_by_source_and_key(tmp_path: Path) -> None:
    tree = activated_examples(tmp_path)
    store = OcigateStore(tmp_path / "credentials.json")
    from ocigate.credentials import Credential

    store.save("mirror-a.example", Credential("ci", PASSWORD), upstream="docker.io", repository_prefix="library")
    marker = tmp_path / "helper-ran"
    (tmp_path / "bin").mkdir()
    helper = tmp_path / "bin" / "docker-credential-vault"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {"registry-1.docker.io": "vault"}}))
    chain = CredentialChain([store, DockerConfig(tmp_path)])
    out = explained(tree, "alpine", find=chain.find)
    assert (
        f"credential: ocigate credentials {tmp_path}/credentials.json "
        "(entry host mirror-a.example, upstream docker.io, prefix library, user 'ci')"
    ) in out
    assert f"credential: credential helper docker-credential-vault (docker config {tmp_path}/config.json)" in out
    assert not marker.exists()  # named, never run
    assert PASSWORD not in out


def test_the_policy_of_the_rules_tree_is_asked_and_its_refusal_said(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text('[user.guest]\npull = ["docker.io/library/busybox"]\n')
    image = parse_image("alpine")
    refusal = policy_refusal(load_policy(tmp_path), "guest", image, False)
    assert refusal is not None and refusal.startswith("refused by") and "user.guest" in refusal
    assert policy_refusal(load_policy(tmp_path), "guest", parse_image("busybox"), False) is None
    out = render(
        explain(
            image,
            None,
            push=False,
            user="guest",
            rules=None,
            named_ref_headers=(),
            find_credential=no_credential,
            refusal=refusal,
        )
    )
    assert f"policy: refused: {refusal}" in out


def test_the_command_explains_the_activated_examples(tmp_path: Path) -> None:
    tree = activated_examples(tmp_path)
    store = tmp_path / "store.json"
    store.write_text(json.dumps([{"host": "mirror-all.example", "username": "ci", "password": PASSWORD}]))
    result = run(
        "explain",
        "quay.io/team/app:v2",
        "--rules",
        str(tree),
        "--set",
        f"ocigate_credentials={store}",
        "--user",
        "builder",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("quay.io/team/app:v2 (pull by proxy user 'builder')\n")
    assert f"rule: {tree}/_default/hosts.toml" in result.stdout
    assert "GET https://mirror-all.example/v2/team/app/manifests/v2?ns=quay.io" in result.stdout
    assert f"credential: ocigate credentials {store} (entry host mirror-all.example, user 'ci')" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr


def test_the_command_says_when_a_registry_has_no_rule(tmp_path: Path) -> None:
    result = run("explain", "alpine", "--rules", str(tmp_path), home=tmp_path)
    assert result.returncode == 0
    assert "rule: none in" in result.stdout and "passes through untouched" in result.stdout


def test_the_command_on_a_broken_tree_or_image_names_the_cause(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", '[host."https://m.example"]\n  capabilities = ["pul"]\n')
    result = run("explain", "alpine", "--rules", str(tmp_path), home=tmp_path)
    assert result.returncode == 1
    assert f'{tmp_path}/docker.io/hosts.toml: host."https://m.example".capabilities' in result.stderr
    result = run("explain", "Not/An/Image", "--rules", str(tmp_path), home=tmp_path)
    assert result.returncode == 1 and "is not an image reference" in result.stderr
    assert os.listdir(tmp_path) == ["docker.io"]  # nothing written


def test_an_upstream_without_a_rule_passes_through_whatever_the_policy(tmp_path: Path) -> None:
    tree = tmp_path / "rules"
    write_hosts(tree, "ruled.example", '[host."https://mirror.example"]\n')
    (tree / "policy.toml").write_text('[user.bob]\npull = ["ruled.example/team"]\n')
    unruled = run("explain", "elsewhere.example/team/app:v1", "--rules", str(tree), "--user", "bob", home=tmp_path)
    ruled = run("explain", "ruled.example/other/app:v1", "--rules", str(tree), "--user", "bob", home=tmp_path)
    assert unruled.returncode == 0 and "policy: refused" not in unruled.stdout, unruled.stdout
    assert ruled.returncode == 0 and "policy: refused" in ruled.stdout, ruled.stdout


def test_the_command_says_that_asking_the_mirrors_directly_is_refused_under_a_policy(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", '[host."https://m.example"]\n')
    said = "policy: a client asking these mirrors directly"
    open_gateway = run("explain", "alpine", "--rules", str(tmp_path), home=tmp_path)
    assert open_gateway.returncode == 0 and said not in open_gateway.stdout
    (tmp_path / "policy.toml").write_text('[upstream."docker.io"]\nblock = ["library/secret"]\n')
    guarded = run("explain", "alpine", "--rules", str(tmp_path), home=tmp_path)
    assert guarded.returncode == 0 and said in guarded.stdout
    assert "at an address of the gateway's own host is refused at every such address, loopback included" in (
        guarded.stdout.replace("\n", " ")
    )
