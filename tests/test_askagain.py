"""askagain.Playback copies mitmproxy's client replay loop: a tripwire for the day mitmproxy's changes."""

import hashlib
import inspect

from mitmproxy.addons import clientplayback

from ocigate.askagain import COPIED_FROM_MITMPROXY


def test_what_playback_copies_from_mitmproxy_is_still_what_it_was_copied_from() -> None:
    changed = []
    for name, copied in COPIED_FROM_MITMPROXY.items():
        found = clientplayback
        for part in name.split("."):
            found = getattr(found, part)
        now = hashlib.sha256(inspect.getsource(found).encode()).hexdigest()
        if now != copied:
            changed.append(f"{name} (sha256 {now})")
    assert not changed, (
        f"mitmproxy's clientplayback changed since askagain.Playback copied it: {', '.join(changed)}. Recheck "
        "Playback and _ReplayHandler against the new source, then update askagain.COPIED_FROM_MITMPROXY."
    )
