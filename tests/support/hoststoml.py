"""A containerd hosts.toml for an upstream and its mirrors, as the end-to-end tests write them."""

from collections.abc import Sequence
from pathlib import Path


def write_mirror_rules(
    rules: Path, upstream: str, mirrors: Sequence[str], capabilities: Sequence[str] = ("pull", "resolve")
) -> Path:
    """`rules/<upstream>/hosts.toml` naming the registry itself as server and `mirrors` (URLs) in order, each with
    `capabilities`; returns `rules`."""
    listed = ", ".join(f'"{capability}"' for capability in capabilities)
    text = f'server = "https://{upstream}"\n' + "".join(
        f'[host."{mirror}"]\n  capabilities = [{listed}]\n' for mirror in mirrors
    )
    (rules / upstream).mkdir(parents=True, exist_ok=True)
    (rules / upstream / "hosts.toml").write_text(text)
    return rules
