"""A request to a ruled upstream whose host fails before answering is still answered by the gateway.

mitmproxy answers a request whose server connection fails before any answer (refused, hung up, cut off when silent)
with an HTML page of its own, after the error hook, which cannot change it. The HTTP layer of a ruled upstream's
connections asks the gateway first (`instead`), which may answer in its place: for a blob with hosts left to ask, a
307 back to the same URL, whose next request ocigate sends to the next host; otherwise an OCI error naming every
host. The gateway keeps its decisions; this module only gives it the chance to make them.

Its streams also send each request and answer as it is to go (`as_sent`, `answer_as_sent`): with what the gateway
keeps out of the flow, where captures see it, put back in (credentials, secret query fields and form values held by
captures.Redaction, the headers ocigate adds to a streamed request, the Set-Cookie and Location of an answer
mitmproxy sends only after recording it).

A flow sent again by mitmproxy's client replay (`replay.client`, mitmweb's replay button, `mitmdump -C`) goes through
the same layer (Playback): mitmproxy's own would send what the flow shows, placeholders included.
"""

import logging
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.addons import clientplayback
from mitmproxy.options import Options
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HTTPMode,
    HttpStream,
    RequestData,
    RequestHeaders,
    RequestProtocolError,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.utils import asyncio_utils

log = logging.getLogger("ocigate")

# What the gateway answers instead of a host that failed before answering (its reason), or None: mitmproxy's own.
Instead = Callable[[http.HTTPFlow, str], http.Response | None]
# The answer as it is sent to the client: what the gateway keeps out of the flow put back in
# (captures.Redaction.answer_as_sent).
AnswerAsSent = Callable[[http.HTTPFlow, http.Response], http.Response]
# The request as it is sent to the host, its body included: what the gateway keeps out of the flow put in
# (streaming.Streams.as_sent, captures.Redaction.as_sent).
AsSent = Callable[[http.HTTPFlow, http.Request], http.Request]


class AskAgainHttpLayer(HttpLayer):
    """mitmproxy's HTTP layer, whose streams let the gateway answer for a host that failed before answering."""

    def __init__(
        self, context: Context, mode: HTTPMode, instead: Instead, answer_as_sent: AnswerAsSent, as_sent: AsSent
    ) -> None:
        super().__init__(context, mode)
        self._instead = instead
        self._answer_as_sent = answer_as_sent
        self._as_sent = as_sent

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        stream = _AskAgainStream(self.context.fork(), stream_id, self._instead, self._answer_as_sent, self._as_sent)
        self.streams[stream_id] = stream
        yield from self.event_to_child(stream, events.Start())


class _AskAgainStream(HttpStream):
    def __init__(
        self, context: Context, stream_id: int, instead: Instead, answer_as_sent: AnswerAsSent, as_sent: AsSent
    ) -> None:
        super().__init__(context, stream_id)
        self._instead = instead
        self._answer_as_sent = answer_as_sent
        self._as_sent = as_sent
        # The body as sent of a request mitmproxy read whole, when it is not the flow's: for its one RequestData.
        self._body: bytes | None = None

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        for command in super().handle_event(event):
            if isinstance(command, SendHttp) and isinstance(command.event, RequestHeaders):
                headers = command.event
                sent = self._as_sent(self.flow, headers.request)
                if sent is not headers.request:
                    command = SendHttp(
                        RequestHeaders(headers.stream_id, sent, headers.end_stream, headers.replay_flow),
                        command.connection,
                    )
                    # A streamed request's body goes as it comes, never held; a whole one goes in one RequestData.
                    whole = not (headers.end_stream or self.flow.request.stream)
                    if whole and sent.raw_content != headers.request.raw_content:
                        self._body = sent.raw_content
            elif isinstance(command, SendHttp) and isinstance(command.event, RequestData) and self._body is not None:
                command = SendHttp(RequestData(command.event.stream_id, self._body), command.connection)
                self._body = None
            elif isinstance(command, SendHttp) and isinstance(command.event, ResponseHeaders):
                answer = command.event
                sent_answer = self._answer_as_sent(self.flow, answer.response)
                if sent_answer is not answer.response:
                    command = SendHttp(
                        ResponseHeaders(answer.stream_id, sent_answer, answer.end_stream), command.connection
                    )
            yield command

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> layer.CommandGenerator[None]:
        # Only a host's failure before its answer, once the client has said all it had to say, on a flow nobody
        # killed: an answer of the gateway's then ends the exchange as any answer would.
        unanswered = isinstance(event, ResponseProtocolError) and self.flow.response is None and not self.flow.error
        if unanswered and self.client_state == self.state_done:
            try:
                response = self._instead(self.flow, event.message)
            except Exception:
                # This runs inside mitmproxy's layer, not in a hook: an error here would stop the whole connection.
                log.exception("ocigate: internal error answering for a host that failed")
                response = None
            if response is not None:
                self.flow.response = response
                yield from self.send_response()
                return
        yield from super().handle_protocol_error(event)


# The HTTP layer the gateway puts on a connection of the given mode (httponly.HttpOnly.http_layer).
MakeLayer = Callable[[Context, HTTPMode], HttpLayer]


# What Playback copies from mitmproxy 12.3's clientplayback or relies on, by the sha256 of its source: the replay loop
# (copied, for the handler it names), the start that runs it, the handler's construction of the HTTP layer it
# replaces, and the MockServer it puts back the same way. tests/test_askagain.py fails when one differs: recheck
# Playback and update on a mitmproxy upgrade.
COPIED_FROM_MITMPROXY = {
    "ClientPlayback.running": "55c6a0c2b9417495fd008d4ff352da8b032b2469709bd957f2d973ce6026c897",
    "ClientPlayback.playback": "aa7c4b9f5e044ae245b9c691a555ebd7f2317b27e4e10959b5057d641f62d794",
    "ReplayHandler.__init__": "3830fad55fab2d87e9c4f614df4c465726ef77073947eb46c7b9ec87435f60ab",
    "MockServer.__init__": "4122cc5e0e4608a87d329360bc335a35418ab460a9cc625197980e970cb541e6",
}


class Playback(clientplayback.ClientPlayback):
    """mitmproxy's client replay, each replayed flow sent through the gateway's HTTP layer: the credential, query and
    form values ocigate chose for a request it streams are put in as it goes (as_sent), as for the client's own.
    Takes the place of mitmproxy's (same name, options and commands), under the `ocigate` command (cli.py)."""

    name = "clientplayback"

    def __init__(self, make_layer: MakeLayer) -> None:
        super().__init__()
        self._make_layer = make_layer

    async def playback(self) -> None:
        # mitmproxy's loop, whose ReplayHandler is named in its body: the same, with the handler below.
        while True:
            self.inflight = await self.queue.get()
            try:
                handler = _ReplayHandler(self.inflight, self.options, self._make_layer)
                if self.options.client_replay_concurrency == -1:
                    task = asyncio_utils.create_task(
                        handler.replay(), name="client playback awaiting response", keep_ref=False
                    )
                    self.replay_tasks.add(task)  # kept: not garbage collected while it runs
                    task.add_done_callback(self.replay_tasks.remove)
                else:
                    await handler.replay()
            except Exception:
                log.exception("ocigate: client replay failed")
            self.queue.task_done()
            self.inflight = None


class _ReplayHandler(clientplayback.ReplayHandler):
    """mitmproxy's replay of one flow, on the gateway's HTTP layer (in the mode mitmproxy chose) instead of its own."""

    def __init__(self, flow: http.HTTPFlow, options: Options, make_layer: MakeLayer) -> None:
        super().__init__(flow, options)
        plain = self.layer
        context = plain.context
        del context.layers[context.layers.index(plain) :]
        self.layer = make_layer(context, plain.mode)
        self.layer.connections[context.client] = clientplayback.MockServer(flow, context.fork())
