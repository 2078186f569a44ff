"""The one wrapper around a streamed answer's hook: what it hands on, what it counts, what it keeps, and that the
addons that read it share one."""

import hashlib

from mitmproxy.test import tflow, tutils

from ocigate.captures import Redaction
from ocigate.passing import MAX_KEPT, Passing, around, bytes_sent, keeping
from ocigate.verify import StreamVerifier
from tests.test_trust import through


def test_it_hands_on_what_the_hook_gives_and_counts_it() -> None:
    verified = Passing(StreamVerifier("sha256:" + hashlib.sha256(b"abcdef").hexdigest()))
    assert not verified.streaming
    assert through(verified, [b"abc", b"def"]) == [b"abc", b"def"]
    assert verified.sent == 6 and verified.streaming
    plain = Passing(None)
    assert through(plain, [b"xy"]) == [b"xy"] and plain.sent == 2
    giving_bytes = Passing(lambda chunk: chunk.upper())
    assert through(giving_bytes, [b"ab"]) == [b"AB"]  # the end's b"" gives no piece: it would end a chunked body


def test_it_keeps_a_copy_only_when_asked_and_only_up_to_max_kept() -> None:
    plain = Passing(None)
    through(plain, [b"secret"])
    assert not plain.data
    kept = Passing(None, keep=True)
    through(kept, [b"a" * 10, b"b" * 10])
    assert kept.data == b"a" * 10 + b"b" * 10 and not kept.overflowed
    kept(b"c" * MAX_KEPT)
    assert kept.overflowed and not kept.data and kept.sent == 20 + MAX_KEPT


def test_an_answer_is_wrapped_once_whoever_asks_first() -> None:
    response = tutils.tresp()
    assert around(response) is None  # sent whole: nothing to wrap
    hook = StreamVerifier("sha256:" + "0" * 64)
    response.stream = hook
    first = around(response)
    assert first is not None and response.stream is first
    assert around(response) is first and keeping(response) is first and first.keep
    whole = tutils.tresp()
    kept = keeping(whole)
    assert whole.stream is kept and kept.keep


def test_bytes_sent_are_those_that_passed_or_the_whole_content() -> None:
    response = tutils.tresp(content=b"0123456789")
    assert bytes_sent(None, None) == 0
    assert bytes_sent(response, None) == 10
    unused = Passing(None)
    assert bytes_sent(response, unused) == 10  # never streamed: mitmproxy sent the content
    used = Passing(lambda chunk: chunk[:2])
    through(used, [b"abcd"])
    assert bytes_sent(response, used) == 2


def test_the_captures_and_the_access_log_read_one_wrapper() -> None:
    flow = tflow.tflow(resp=True)
    flow.response.stream = StreamVerifier("sha256:" + hashlib.sha256(b"blob").hexdigest())
    counting = around(flow.response)
    Redaction().responseheaders(flow)
    assert flow.response.stream is counting
