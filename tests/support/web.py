"""`ocigate web` for the tests, and the headless Chromium that looks at its page: Debian's `chromium`, driven by
Playwright (which is never asked to download a browser of its own)."""

import secrets as random
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Browser, sync_playwright

from . import secrets
from .gateway import Gateway, running_gateway
from .processes import wait_until
from .registry import free_port
from .world import RUN_SH

# Kept after the run for a person to look at (pytest's cache directory: ignored by git, never committed).
ARTIFACTS = Path(__file__).resolve().parents[2] / ".pytest_cache" / "ocigate-artifacts"

_WEB_START_TIMEOUT = 30.0


@dataclass
class WebGateway:
    gateway: Gateway
    web_port: int
    password: str

    @property
    def page_url(self) -> str:
        """mitmweb's page, opened with its password as the `token` mitmweb takes in place of its login form."""
        return f"http://127.0.0.1:{self.web_port}/?token={self.password}"


@contextmanager
def running_web_gateway(
    workdir: Path, rules: Path, host_map: Mapping[str, str] = {}, options: Sequence[str] = ()
) -> Iterator[WebGateway]:
    """The gateway started as `./run.sh web` (`ocigate web`), its UI on a free loopback port behind a password of the
    test's, with `options` (mitmproxy's `--set`) besides."""
    web_port = free_port()
    password = random.token_hex(16)
    secrets.remember(password)
    web = (f"web_port={web_port}", "web_host=127.0.0.1", "web_open_browser=false", f"web_password={password}")
    entry_point = (str(RUN_SH), "web")
    with running_gateway(workdir, rules, host_map, (*web, *options), entry_point=entry_point) as gateway:
        wait_until(
            lambda: _listening(web_port),
            _WEB_START_TIMEOUT,
            lambda why: f"mitmweb did not listen on port {web_port}: {why}:\n{gateway.log_text()[-3000:]}",
            process=gateway.process,
        )
        yield WebGateway(gateway, web_port, password)


@contextmanager
def headless_chromium() -> Iterator[Browser]:
    """Debian's chromium, headless. Without its sandbox, which refuses to start as root."""
    executable = shutil.which("chromium")
    assert executable, "chromium is not installed (./run.sh test installs the Debian package)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, chromium_sandbox=False)
        try:
            yield browser
        finally:
            browser.close()


def artifact(name: str) -> Path:
    """Where a test keeps a file for a person to look at after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
