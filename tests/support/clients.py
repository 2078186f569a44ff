"""Real clients run through the test gateway, with every setting that could leak in from the machine replaced."""

import json
import os
import subprocess
from pathlib import Path

from .gateway import Gateway
from .images import Image, sha256_digest


def client_env(gateway: Gateway, home: Path) -> dict[str, str]:
    """HTTPS_PROXY at the gateway, a private HOME, an empty auth file, and the gateway's CA in every bundle
    variable this machine exports."""
    home.mkdir(parents=True, exist_ok=True)
    auth_file = home / "auth.json"
    if not auth_file.exists():
        auth_file.write_text(json.dumps({"auths": {}}))
    bundle = gateway.ca_bundle(home)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        HOME=str(home),
        HTTPS_PROXY=gateway.proxy_url,
        HTTP_PROXY=gateway.proxy_url,
        REGISTRY_AUTH_FILE=str(auth_file),
        DOCKER_CONFIG=str(home / ".docker"),
        SSL_CERT_FILE=str(bundle),
        REQUESTS_CA_BUNDLE=str(bundle),
        CURL_CA_BUNDLE=str(bundle),
        XDG_RUNTIME_DIR=str(home / "run"),
    )
    return env


def skopeo(gateway: Gateway, home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs skopeo with the gateway as its proxy; the caller asserts on the result."""
    return subprocess.run(
        ["skopeo", *args],
        env=client_env(gateway, home),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def skopeo_copy_to_layout(
    gateway: Gateway, home: Path, reference: str, *flags: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """`skopeo copy docker://<reference> oci:<home>/layout:copied` through the gateway, trusting its CA."""
    layout = home / "layout"
    result = skopeo(
        gateway,
        home,
        "copy",
        *flags,
        "--src-cert-dir",
        str(gateway.cert_dir(home)),
        f"docker://{reference}",
        f"oci:{layout}:copied",
    )
    return result, layout


def skopeo_inspect_raw(gateway: Gateway, home: Path, reference: str) -> subprocess.CompletedProcess:
    return skopeo(gateway, home, "inspect", "--raw", "--cert-dir", str(gateway.cert_dir(home)), f"docker://{reference}")


def assert_layout_holds(layout: Path, image: Image) -> None:
    """The OCI layout a copy wrote holds the image's manifest, config and layers, each with the bytes of its digest."""
    for blob in (image.manifest, image.config, *image.layers):
        path = layout / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert sha256_digest(path.read_bytes()) == blob.digest, f"{blob.digest} is missing or wrong in {layout}"
