"""mitmproxy's own log lines hold no URL userinfo nor secret query field once the gateway runs (ScrubbedLogs)."""

import contextlib
import io
import logging
import string
import subprocess
import sys
from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocigate import scrub
from ocigate.logscrub import MAX_MESSAGE, ScrubbedLogs


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_mitmproxys_lines_lose_url_userinfo_on_every_handler_while_the_gateway_runs() -> None:
    kept = _Kept()
    root = logging.getLogger()
    root.addHandler(kept)
    scrubbed = ScrubbedLogs()
    try:
        scrubbed.running()
        bad_line = "HTTP/1 protocol error: Bad HTTP request line: %r"
        logging.getLogger("mitmproxy.proxy.server").warning(bad_line, b"GET http://alice:pw-0123@h.test/ HTTP/1.1")
        logging.getLogger("mitmproxy").warning("token in http://tok-0123@h.test/v2/")
        logging.getLogger("someone.else").warning("http://bob:kept-0123@h.test/")  # not mitmproxy's: left alone
        scrubbed.done()
        logging.getLogger("mitmproxy.proxy.server").warning("after http://carol:pw-4567@h.test/")
    finally:
        root.removeHandler(kept)
    assert kept.lines == [
        "HTTP/1 protocol error: Bad HTTP request line: b'GET http://alice:<redacted>@h.test/ HTTP/1.1'",
        "token in http://<redacted>@h.test/v2/",
        "http://bob:kept-0123@h.test/",
        "after http://carol:pw-4567@h.test/",  # the filter is gone with the gateway
    ]


def _through_the_filter(logger: str, msg: object, *args: object) -> tuple[list[str], str]:
    """What a handler of the root logger writes of one record, and what went to stderr, with the gateway running."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    scrubbed = ScrubbedLogs()
    errors = io.StringIO()
    try:
        scrubbed.running()
        with contextlib.redirect_stderr(errors):
            logging.getLogger(logger).warning(msg, *args)
    finally:
        scrubbed.done()
        root.removeHandler(handler)
    return stream.getvalue().splitlines(), errors.getvalue()


def test_secret_query_fields_lose_their_values_and_keep_their_shape() -> None:
    line = b"GET /token?service=registry&Access_Token=tok-0123&scope=repository:a:pull&password=pw%2F0123 HTTP/1.1"
    lines, _ = _through_the_filter("mitmproxy.proxy.server", "Bad HTTP request line: %r", line)
    assert lines == [
        "Bad HTTP request line: "
        "b'GET /token?service=registry&Access_Token=<redacted>&scope=repository:a:pull&password=<redacted> HTTP/1.1'"
    ]


def test_a_record_whose_arguments_do_not_fit_its_format_is_shown_redacted_and_raises_nothing() -> None:
    secret = "fmt-secret-0123"
    lines, stderr = _through_the_filter(
        "mitmproxy.proxy.server", "request %s to http://alice:%s@h.test/?token=" + secret + " failed %d", "GET", secret
    )
    assert lines == [
        "request %s to http://alice:<redacted>@h.test/?token=<redacted> failed %d"
        " (its arguments could not be formatted)"
    ]
    # Nothing for logging's handleError to print (it would print the format and the arguments raw).
    assert stderr == ""
    assert secret not in "\n".join(lines)


def test_a_message_longer_than_max_message_is_cut_and_says_so_and_what_is_kept_is_scrubbed() -> None:
    long_line = "GET /x?token=tok-0123&a=" + "b" * MAX_MESSAGE + "&password=pw-4567 HTTP/1.1"
    lines, stderr = _through_the_filter("mitmproxy.proxy.server", "Bad HTTP request line: %s", long_line)
    (line,) = lines
    assert line.startswith("Bad HTTP request line: GET /x?token=<redacted>&a=bbb")
    redacted = "Bad HTTP request line: " + long_line.replace("tok-0123", "<redacted>").replace("pw-4567", "<redacted>")
    assert line.endswith(f"... ({len(redacted) - MAX_MESSAGE} characters more not shown)")
    assert "tok-0123" not in line and "pw-4567" not in line and stderr == ""


def test_a_url_across_the_cut_loses_its_secret_before_it_is_cut() -> None:
    padding = "p" * (MAX_MESSAGE - 30)
    for url in ("http://user:SECRET-PASSWORD-0123@h.test/", "http://SECRET-TOKEN-0123456789@h.test/"):
        lines, _ = _through_the_filter("mitmproxy.proxy.server", "%s %s", padding, url)
        assert "SECRET" not in "\n".join(lines), lines[0][-80:]


def test_a_traceback_and_a_stack_are_scrubbed_into_the_message() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    scrubbed = ScrubbedLogs()
    try:
        scrubbed.running()
        try:
            raise ValueError("http://user:SECRET-PW-0123@h.test/x?token=SECRET-TOKEN-0123")
        except ValueError:
            logging.getLogger("mitmproxy.addonmanager").exception("Addon error: %s", "boom")
        logging.getLogger("mitmproxy.proxy").warning("at http://u:SECRET-STACK@h.test/", stack_info=True)
    finally:
        scrubbed.done()
        root.removeHandler(handler)
    written = stream.getvalue()
    assert "Addon error: boom" in written and "ValueError: http://user:<redacted>@h.test/x?token=<redacted>" in written
    assert "Stack (most recent call last)" in written
    assert "SECRET" not in written


@pytest.mark.parametrize(
    "text",
    [
        "1http://u:SECRET-0123@h.test/",  # a scheme glued to what comes before it
        "x=-http://u:SECRET-0123@h.test/",
        "GET /x?a=1;token=SECRET-0123 HTTP/1.1",  # `;` as old Go servers read it
        "https://app.test/cb#access_token=SECRET-0123&x=1",  # OAuth's fragment
        "/x;password=SECRET-0123",
    ],
)
def test_secrets_in_odd_but_real_shapes_are_redacted(text: str) -> None:
    assert "SECRET" not in scrub.text_urls(text)


def test_a_message_whose_str_raises_is_replaced_and_nothing_raises() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    lines, stderr = _through_the_filter("mitmproxy.proxy.server", Unprintable(), "arg")
    assert lines == ["a log message of mitmproxy's that ocigate could not look for secrets in, not shown"]
    assert stderr == ""


def test_fields_nested_in_field_values_are_read_without_recursion() -> None:
    # Each value holds the next field: read on as text, not by a call per level (a 3.6 KB line exceeded the stack).
    nested = "GET /?" + "a=?" * 5000 + "token=tok-0123 HTTP/1.1"
    assert scrub.text_urls(nested) == nested.replace("tok-0123", "<redacted>")
    assert (
        scrub.text_urls("?next=https://u:pw@h.test/?token=t&x=1")
        == "?next=https://u:<redacted>@h.test/?token=<redacted>&x=1"
    )


# A hang guard, not a speed test: the old pattern took time quadratic in a run of letters (10 s for 128 KiB, minutes
# for this line); the limit is far beyond what a linear scan needs on any machine.
_HANG = f"""
import sys
sys.path[:0] = {sys.path!r}
from ocigate import scrub
text = "GET /" + "A" * (1 << 20) + " HTTP/1.1 " + "9" * (1 << 20) + "+" * (1 << 20)
assert scrub.text_urls(text) == text
"""


def test_a_long_run_of_letters_is_scrubbed_without_hanging() -> None:
    subprocess.run([sys.executable, "-c", _HANG], check=True, timeout=120)


_UNRESERVED = string.ascii_letters + string.digits + "-._~"
# What a URL's userinfo and query values are made of: unreserved characters, sub-delimiters and escapes.
_URL_TEXT = st.lists(
    st.sampled_from([*_UNRESERVED, *"!$'()*+,;=:", *(f"%{b:02X}" for b in range(256))]), min_size=1, max_size=20
).map("".join)


def _secret() -> st.SearchStrategy[str]:
    # A marker no other part of the line holds, so that finding the secret's text means it leaked.
    return _URL_TEXT.map(lambda text: f"SeCrEt{text}")


@given(
    user=st.text(_UNRESERVED, min_size=1, max_size=8),
    password=_secret(),
    lone_user=st.booleans(),
    fields=st.lists(
        st.tuples(st.sampled_from(sorted(scrub.SECRET_FIELDS)), st.booleans(), _secret()), min_size=1, max_size=3
    ),
    other=st.lists(st.tuples(st.text(string.ascii_lowercase, min_size=1, max_size=6), _URL_TEXT), max_size=3),
    shape=st.sampled_from(["%s", "%r", "url %s: 404", "b'GET %s HTTP/1.1'"]),
    fragment=st.booleans(),
)
def test_no_secret_of_a_url_survives_in_mitmproxys_lines(
    user: str,
    password: str,
    lone_user: bool,
    fields: list[tuple[str, bool, str]],
    other: list[tuple[str, str]],
    shape: str,
    fragment: bool,
) -> None:
    # A lone userinfo is a user name (a token sent as one): a ':' in it would begin a password, the name kept.
    userinfo = password.replace(":", "%3A") if lone_user else f"{user}:{password}"
    query = [(name.upper() if upper else name, value) for name, upper, value in fields] + other
    url = f"https://{userinfo}@registry.test:5000/v2/token?" + "&".join(f"{n}={v}" for n, v in query)
    url += "#frag" if fragment else ""
    lines, stderr = _through_the_filter("mitmproxy.proxy.server", shape, url)
    shown = "\n".join(lines) + stderr
    assert "SeCrEt" not in shown, shown
    for name, _ in query[: len(fields)]:
        assert f"{name}=<redacted>" in shown


def test_a_secret_percent_encoded_in_another_fields_value_redacts_that_value_whole() -> None:
    R = "<redacted>"
    assert scrub.text_urls("GET /login?next=https%3A%2F%2Fu%3Apw%40h.test%2F&x=1 HTTP/1.1") == (
        f"GET /login?next={R}&x=1 HTTP/1.1"
    )
    assert scrub.text_urls("?redirect=%2Fv2%2Ftoken%3Faccess_token%3Dabc%26x%3D1") == f"?redirect={R}"
    # Encoded twice: `%253A` is `%3A` once decoded.
    assert scrub.text_urls("?next=https%253A%252F%252Fu%253Apw%2540h") == f"?next={R}"
    assert scrub.url("https://reg.test/login?next=https%3A%2F%2Fu%3Apw%40h.test%2F") == (
        f"https://reg.test/login?next={R}"
    )
    assert scrub.form("grant=x&next=%3Ftoken%3Dabc") == f"grant=x&next={R}"
    # What encodes no secret is kept as it was.
    for kept in (
        "?q=a%20b&next=%2Fv2%2Fteam%2Fapp",
        "?next=https%3A%2F%2Fh.test%2Fv2%2F",
        "?scope=repository%3Aa%3Apull",
    ):
        assert scrub.text_urls(kept) == kept
    assert scrub.url("https://reg.test/x?next=%2Fv2%2F") == "https://reg.test/x?next=%2Fv2%2F"


# A hang guard, as above: fields nested by a raw `?` with a percent sign at the end (each character decoded at most
# once a level), and `%25` decoding to `%` level after level (only _ENCODINGS levels read).
_NESTED = f"""
import sys
sys.path[:0] = {sys.path!r}
from ocigate import scrub
for text in ("GET /?" + "a=?" * 100000 + "b=%41 HTTP/1.1", "?next=%" + "25" * 100000 + "41", "?a=%2525&" * 30000):
    assert scrub.text_urls(text) == text
"""


def test_nested_and_repeated_encodings_are_read_without_hanging() -> None:
    subprocess.run([sys.executable, "-c", _NESTED], check=True, timeout=120)


def test_an_encoded_secret_is_found_with_a_plus_in_it_split_by_a_raw_question_mark_or_not_encoded_at_all() -> None:
    R = "<redacted>"
    # A `+` kept as it is (JavaScript's escape(), base64 tokens): not a space within a password.
    assert (
        scrub.text_urls("GET /login?next=https%3A%2F%2Fu%3Aab+cd%40h.test HTTP/1.1") == f"GET /login?next={R} HTTP/1.1"
    )
    assert scrub.text_urls("GET /login?next=https%3A//u%3Aab+cd@h.test/ HTTP/1.1") == f"GET /login?next={R} HTTP/1.1"
    assert (
        scrub.url("https://reg.test/login?next=https%3A%2F%2Fu%3Aab+SECRET%40h") == f"https://reg.test/login?next={R}"
    )
    # A raw `?` within the encoded value: the field after it is decoded with the value, not apart.
    assert scrub.text_urls("GET /login?next=%2Fv2%2Ftoken?access_token%3DSECRET HTTP/1.1") == (
        f"GET /login?next={R} HTTP/1.1"
    )
    # In a capture's URL or form, a value that holds a secret as it is: the pair is redacted whole.
    assert scrub.url("https://reg.test/login?next=https://u:SECRET@h.test/") == f"https://reg.test/login?next={R}"
    assert scrub.url("https://reg.test/login?next=/token?access_token=SECRET&x=1") == (
        f"https://reg.test/login?next={R}&x=1"
    )
    assert scrub.form("next=%3Ftoken%3dSECRET&a=1") == f"next={R}&a=1"  # lower-case hex


@given(
    secret=st.text(string.ascii_letters + string.digits, min_size=6, max_size=12).map(lambda text: f"SeCrEt{text}"),
    times=st.integers(1, 3),
    where=st.sampled_from(["https://user:{}@h.test/", "/v2/token?access_token={}", "https://{}@h.test/"]),
    name=st.sampled_from(["next", "redirect_uri", "state"]),
)
def test_a_secret_encoded_up_to_three_times_in_a_field_value_never_shows(
    secret: str, times: int, where: str, name: str
) -> None:
    value = where.format(secret)
    for _ in range(times):
        value = quote(value, safe="")
    line = f"GET /login?{name}={value}&x=1 HTTP/1.1"
    assert secret not in unquote(unquote(unquote(scrub.text_urls(line))))
    assert secret not in unquote(unquote(unquote(scrub.url(f"https://reg.test/login?{name}={value}&x=1"))))
