"""The `ocigate` command: mitmdump (or, as `ocigate web`, mitmweb) with the ocigate addons loaded and the settings they
depend on."""

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

from mitmproxy import http
from mitmproxy.flow import Flow
from mitmproxy.options import Options
from mitmproxy.tools import cmdline
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.tools.main import run
from mitmproxy.tools.web import app as web_app
from mitmproxy.tools.web.master import WebMaster

from . import workers
from .addon import make_addons
from .askagain import Playback
from .captures import Redaction
from .httponly import HttpOnly
from .worker import ENVIRONMENT, Identity, follow_parent, label_output

USAGE_EXTRA = """
ocigate takes every mitmdump flag; `ocigate web` every mitmweb flag (--web-host, --web-port, ...) and shows the
flows in mitmweb's UI, each with ocigate's decision as its comment. Its own:
  --rules DIR      containerd hosts.toml tree (certs.d layout); same as --set ocigate_rules=DIR
  --workers N      N gateway processes sharing the listening address, the CA and the rules (not with `ocigate web`)
"""


def _add_ocigate(master: DumpMaster | WebMaster, worker: Identity | None = None) -> None:
    ours = make_addons(worker)
    master.addons.add(*ours)
    # mitmproxy's client replay sends a flow through an HTTP layer of its own, which would send what the flow shows
    # (placeholders where the gateway holds its secrets): ocigate's sends it through the gateway's. Replaced before
    # the command line's options are set, so its own (client_replay, ...) take them.
    httponly = next(addon for addon in ours if isinstance(addon, HttpOnly))
    # (Not AddonManager.remove: it would run mitmproxy's async `done` outside a loop; nothing of it has started.)
    at = master.addons.chain.index(master.addons.lookup.pop("clientplayback"))
    del master.addons.chain[at]
    playback = Playback(httponly.http_layer)
    master.addons.add(playback)
    master.addons.chain.remove(playback)
    master.addons.chain.insert(at, playback)
    # Where `mitmdump -s addons/gateway.py` puts them, so both run alike: after proxyauth (a client without proxy
    # credentials never reaches a rule) and before save, dumper and mitmweb's view (which then see redacted flows,
    # and a flow's comment as soon as it is shown).
    scripts = master.addons.chain.index(master.addons.get("scriptloader"))
    rest = [addon for addon in master.addons.chain if addon not in ours]
    master.addons.chain = [*rest[: scripts + 1], *ours, *rest[scripts + 1 :]]


class OcigateMaster(DumpMaster):
    def __init__(self, options: Options, worker: Identity | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        _add_ocigate(self, worker)


class OcigateWebMaster(WebMaster):
    """The gateway with mitmweb's UI."""

    def __init__(self, options: Options, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        _add_ocigate(self)
        # mitmweb shows a flow from its request headers on, before the request is sent and its secrets can be
        # redacted in it (the Authorization ocigate adds among them): its page is sent a redacted stand-in instead.
        redaction = next(addon for addon in self.addons.chain if isinstance(addon, Redaction))
        web_app.flow_to_json = partial(_redacted_json, redaction)
        # The flow list shows each flow's comment, where ocigate says what it decided (a --set web_columns= wins).
        self.options.update(web_columns=[*self.options.web_columns, "comment"])


_flow_to_json = web_app.flow_to_json


def _redacted_json(redaction: Redaction, flow: Flow) -> dict:
    """mitmweb's JSON of a flow, from a stand-in with its secrets redacted (see captures.Redaction.shown)."""
    return _flow_to_json(redaction.shown(flow) if isinstance(flow, http.HTTPFlow) else flow)


def _mitmdump_filters(args: argparse.Namespace) -> dict[str, str]:
    # What mitmdump itself does with trailing filter expressions.
    if args.filter_args:
        expression = " ".join(args.filter_args)
        return {"save_stream_filter": expression, "readfile_filter": expression, "dumper_filter": expression}
    return {}


def translate(argv: Sequence[str]) -> list[str]:
    """ocigate's command line as mitmdump's: --rules becomes an option, and the connection strategy is fixed."""
    out = ["--set", "connection_strategy=lazy"]
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--rules":
            if not args:
                raise SystemExit("ocigate: --rules needs a directory")
            out += ["--set", f"ocigate_rules={args.pop(0)}"]
        elif arg.startswith("--rules="):
            out += ["--set", f"ocigate_rules={arg.removeprefix('--rules=')}"]
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("login", "logout"):
        from . import login  # only here: the gateway itself never needs it

        raise SystemExit(login.main(argv))
    if argv and argv[0] == "report":
        from . import report  # only here: the gateway itself never needs it

        raise SystemExit(report.main(argv))
    if argv and argv[0] == "check":
        from . import check  # only here: the gateway itself never needs it

        raise SystemExit(check.main(argv))
    if argv and argv[0] == "explain":
        from . import explain  # only here: the gateway itself never needs it

        raise SystemExit(explain.main(argv))
    helping = "-h" in argv or "--help" in argv
    if helping:
        print(USAGE_EXTRA)
    web = bool(argv) and argv[0] == "web"
    count, argv = workers.split(argv[1:] if web else argv)
    if web:
        if count > 1:
            raise SystemExit(
                "ocigate web: --workers cannot be used with mitmweb's UI, which shows the flows of one process; "
                "run `ocigate --workers N` without it"
            )
        run(OcigateWebMaster, cmdline.mitmweb, translate(argv))
        return
    try:
        worker = Identity.from_environment(os.environ)
    except ValueError as e:
        raise SystemExit(f"ocigate: {e}") from None
    # Read once: what this worker starts (credential helpers) is no worker.
    os.environ.pop(ENVIRONMENT, None)
    if worker is None and count > 1 and not helping:
        raise SystemExit(workers.run(count, argv))
    if worker is not None:
        follow_parent(worker)
        label_output(worker)
    # mitmproxy's run() makes the master from the options alone: this one knows which worker it is.
    master = cast(type[OcigateMaster], partial(OcigateMaster, worker=worker))
    run(master, cmdline.mitmdump, translate(argv), _mitmdump_filters)


if __name__ == "__main__":
    main()
