"""`ocigate login` as installed, against a real registry (docker-registry with htpasswd)."""

import os
import subprocess
import sys
from pathlib import Path

from ocigate.credentials import Credential, OcigateStore, StoreEntry
from tests.support.registry import running_registry, write_htpasswd
from tests.test_login import PASSWORD, USER


def ocigate(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(
        [sys.executable, "-m", "ocigate.cli", *args], input=stdin, capture_output=True, text=True, timeout=60, env=env
    )


def test_ocigate_login_against_a_real_registry(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    store = tmp_path / "home" / "credentials.json"
    with running_registry(tmp_path / "registry", htpasswd=htpasswd) as registry:
        common = ["--credentials", str(store), "--map-host", f"registry.test=127.0.0.1:{registry.port}"]
        target = f"http://registry.test:{registry.port}"

        wrong = ocigate("login", "-u", USER, "--password-stdin", *common, target, stdin="not-" + PASSWORD + "\n")
        assert wrong.returncode == 1, wrong.stderr
        assert f"registry.test:{registry.port} refused the credential of '{USER}' (HTTP 401)" in wrong.stderr
        assert PASSWORD not in wrong.stdout + wrong.stderr
        assert not store.exists()

        good = ocigate(
            *("login", "--namespace", "upstream.test", "-u", USER, "--password-stdin", *common, target),
            stdin=PASSWORD + "\n",
        )
        assert good.returncode == 0, good.stderr
        assert good.stdout.startswith(f"Login succeeded: registry.test:{registry.port} (namespace upstream.test)")
        assert PASSWORD not in good.stdout + good.stderr
        # The registry saw the mirror ping (and ignores ns=, as distribution does) and accepted the credential.
        registry.wait_for_uri("/v2/?ns=upstream.test")
        assert [(e.uri, e.status) for e in registry.access_log() if "ns=" in e.uri][-1] == (
            "/v2/?ns=upstream.test",
            200,
        )

    assert OcigateStore(store).entries() == (
        StoreEntry(f"registry.test:{registry.port}", Credential(USER, PASSWORD), "upstream.test"),
    )
    assert store.stat().st_mode & 0o777 == 0o600
    removed = ocigate("logout", "--namespace", "upstream.test", "--credentials", str(store), target, stdin="")
    assert removed.returncode == 0, removed.stderr
    assert OcigateStore(store).entries() == ()
