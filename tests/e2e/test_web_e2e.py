"""`ocigate web`: skopeo pulls through the gateway running with mitmweb's UI, and headless Chromium reads mitmweb's flow
list: each flow of the pull says what ocigate decided for it, and the failed one stands out."""

import time
from pathlib import Path

from tests.support.clients import skopeo_copy_to_layout, skopeo_inspect_raw
from tests.support.web import artifact, headless_chromium, running_web_gateway
from tests.support.world import UPSTREAM, World

# What mitmweb shows of the mark ocigate puts on a failed flow (record.FAILED_MARK, ":x:").
FAILED = "❌"
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
