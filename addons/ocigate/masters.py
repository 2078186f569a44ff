"""The gateway's mitmproxy masters: mitmdump's (`ocigate`) and mitmweb's (`ocigate web`) with the ocigate addons in
their place in the chain, and how cli.py runs them. Apart from cli.py so that the parent of `ocigate --workers N`,
which runs no gateway, does not import mitmproxy."""

import argparse
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

from .addon import make_addons
from .askagain import Playback
from .captures import Redaction
from .hookindex import index_hooks
from .httponly import HttpOnly
from .oneentry import OneEntry
from .workeridentity import Identity


def _add_ocigate(master: DumpMaster | WebMaster, worker: Identity | None = None) -> None:
    index_hooks(master.addons)
    ours = OneEntry(make_addons(worker))
    master.addons.add(ours)
    # mitmproxy's client replay sends a flow through an HTTP layer of its own, which would send what the flow shows
    # (placeholders where the gateway holds its secrets): ocigate's sends it through the gateway's. Replaced before
    # the command line's options are set, so its own (client_replay, ...) take them.
    httponly = ours.member(HttpOnly)
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
    rest = [addon for addon in master.addons.chain if addon is not ours]
    master.addons.chain = [*rest[: scripts + 1], ours, *rest[scripts + 1 :]]


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
        redaction = self.addons.get(OneEntry.name).member(Redaction)
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


def serve(arguments: Sequence[str], worker: Identity | None) -> None:
    """mitmdump with the ocigate addons, from mitmdump's command line (cli.translate's)."""
    # mitmproxy's run() makes the master from the options alone: this one knows which worker it is.
    master = cast(type[OcigateMaster], partial(OcigateMaster, worker=worker))
    run(master, cmdline.mitmdump, arguments, _mitmdump_filters)


def serve_web(arguments: Sequence[str]) -> None:
    """mitmweb with the ocigate addons, from mitmweb's command line."""
    run(OcigateWebMaster, cmdline.mitmweb, arguments)
