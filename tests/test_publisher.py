"""Publishing over real sockets (bus/publisher.py): what goes on the wire, every answer and failure, the pool, TLS."""
import datetime
import ipaddress
import json
import socket
import ssl
import threading

import pytest

from bus_containers_provider.bus.client import EventsClient, EventsError, EventsRejected, EventsUnavailable
from recorder import Recorder

pytestmark = pytest.mark.timeout(30)

TOKEN = "secret-provider-token"


def answering(status, body=b'{"accepted":true}', headers=()):
    def answer(handler):
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in headers):
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def raw(answer: bytes, close: bool = True):
    """An answer written as these exact bytes, then the connection closed (or, if not `close`, kept)."""
    def write(handler):
        handler.wfile.write(answer)
        handler.close_connection = close
    return write


@pytest.fixture
def server(request):
    recorder = Recorder(getattr(request, "param", answering(202)))
    yield recorder
    recorder.close()


def client_of(server, path="", **options):
    return EventsClient(f"http://127.0.0.1:{server.port}{path}", TOKEN, **options)


def publish_once(answer, **options):
    """(what one publish to a server answering with `answer` raised, or None; the server, closed)."""
    server = Recorder(answer)
    client = client_of(server, **options)
    try:
        client.publish("a.request", "cid", {})
        return None, server
    except EventsError as exc:
        return exc, server
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("path", ["", "/", "//", "/X/"])
def test_the_envelope_goes_to_the_events_path_with_the_bearer(server, path):
    client = client_of(server, path)
    client.publish("a.request", "cid-1", {"x": 1, "s": "é\u2028"})
    client.close()
    [(method, target, headers)] = server.seen
    assert (method, target) == ("POST", "/X/api/v1/events" if path == "/X/" else "/api/v1/events")
    assert headers["Authorization"] == f"Bearer {TOKEN}" and headers["Content-Type"] == "application/json"
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    assert json.loads(server.bodies[0]) == {"name": "a.request", "correlationId": "cid-1",
                                            "payload": {"x": 1, "s": "é\u2028"}}


@pytest.mark.parametrize("status,kind,unauthorized,malformed", [
    (200, None, None, None), (202, None, None, None),
    (400, EventsRejected, False, True), (401, EventsRejected, True, False), (403, EventsRejected, True, False),
    (404, EventsRejected, False, True), (429, EventsRejected, False, False), (499, EventsRejected, False, False),
    (201, EventsUnavailable, None, None), (500, EventsUnavailable, None, None), (503, EventsUnavailable, None, None),
])
def test_every_answer_status(status, kind, unauthorized, malformed):
    raised, _ = publish_once(answering(status))
    if kind is None:
        assert raised is None
        return
    assert type(raised) is kind and str(raised) == f"publishing a.request: the Events API answered {status}"
    if unauthorized is not None:
        assert raised.unauthorized is unauthorized and raised.status == status
        assert raised.malformed is malformed


@pytest.mark.parametrize("status", [300, 307, 399])
def test_a_redirect_is_not_followed_and_says_why(status):
    raised, server = publish_once(answering(status, headers=[("Location", "http://elsewhere.test/")]))
    assert type(raised) is EventsUnavailable
    assert str(raised) == (f"publishing a.request: the Events API answered {status}, a redirect, which is "
                           "not followed (set BUS_EVENTS_API_URL to the Events API itself)")
    assert len(server.seen) == 1


@pytest.mark.parametrize("server,message", [
    (raw(b"HTTP/1.1 202 Accepted\r\nContent-Len"), "publishing a.request failed: the connection closed before the answer"),
    (raw(b"SSH-2.0-OpenSSH\r\n\r\n"), "publishing a.request failed: the answer is not HTTP/1"),
    (raw(b"HTTP/1.1 2x2 Huh\r\n\r\n"), "publishing a.request failed: the answer is not HTTP/1"),
    (raw(b"HTTP/1.1 202 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), "publishing a.request failed: ValueError"),
], indirect=["server"])
def test_an_answer_that_is_not_whole_http_is_unavailable(server, message):
    client = client_of(server)
    with pytest.raises(EventsUnavailable) as raised:
        client.publish("a.request", "cid", {})
    client.close()
    assert str(raised.value) == message


def test_nothing_listening_is_unavailable_and_names_the_failure():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = EventsClient(f"http://127.0.0.1:{port}", TOKEN)
    with pytest.raises(EventsUnavailable) as raised:
        client.publish("a.request", "cid", {})
    assert str(raised.value) == "publishing a.request failed: ConnectionRefusedError"
    assert TOKEN not in str(raised.value)


def test_no_answer_within_the_publish_timeout_is_unavailable():
    release = threading.Event()
    raised, _ = publish_once(lambda handler: release.wait(10), publish_timeout=0.2)
    release.set()
    assert type(raised) is EventsUnavailable and str(raised) == "publishing a.request timed out"


def test_the_timeouts_default_to_5_s_to_connect_and_30_s_to_publish(server):
    assert client_of(server)._publisher._timeouts == (5.0, 30.0)
    assert client_of(server, connect_timeout=1, publish_timeout=2)._publisher._timeouts == (1, 2)


def test_a_token_with_a_line_break_is_never_sent(server):
    client = EventsClient(f"http://127.0.0.1:{server.port}", "token\r\nX-Smuggled: 1")
    with pytest.raises(EventsUnavailable) as raised:
        client.publish("a.request", "cid", {})
    assert str(raised.value) == "publishing a.request failed: ValueError"
    assert server.seen == []


class TestTheConnectionPool:
    def test_publishes_one_after_another_share_one_connection(self, server):
        client = client_of(server)
        for n in range(3):
            client.publish("a.request", f"c{n}", {})
        client.close()
        assert (len(server.seen), server.connections) == (3, 1)

    def test_publishes_at_once_never_share_a_connection(self):
        first_in, second_done = threading.Event(), threading.Event()

        def answer(handler):
            if not first_in.is_set():  # the first publish stays unanswered until the second is done
                first_in.set()
                assert second_done.wait(10)
            answering(202)(handler)

        server = Recorder(answer)
        client = client_of(server)
        first = threading.Thread(target=client.publish, args=("a.request", "c1", {}))
        first.start()
        assert first_in.wait(10)
        client.publish("a.request", "c2", {})
        second_done.set()
        first.join(10)
        for n in range(3):  # one at a time again: the two idle connections are reused
            client.publish("a.request", f"c{n + 3}", {})
        client.close()
        server.close()
        assert (len(server.seen), server.connections) == (5, 2)

    @pytest.mark.parametrize("server", [
        answering(202, headers=[("Connection", "close")]),
        answering(202, headers=[("Content-Length", "x")]),
        answering(202, body=b"x" * (1024 * 1024 + 1)),
    ], indirect=True)
    def test_a_connection_the_answer_leaves_unusable_is_not_kept(self, server):
        client = client_of(server)
        client.publish("a.request", "c1", {})
        client.publish("a.request", "c2", {})
        client.close()
        assert server.connections == 2

    @pytest.mark.parametrize("server,connections", [
        (raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}", False), 1),
        (raw(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\n{}\r\n0\r\nTrailer: 1\r\n\r\n",
             False), 1),
        (raw(b"HTTP/1.0 202 Accepted\r\n\r\n{}"), 2),
    ], indirect=["server"])
    def test_interim_chunked_and_close_delimited_answers_are_read(self, server, connections):
        client = client_of(server)
        client.publish("a.request", "c1", {})
        client.publish("a.request", "c2", {})  # on the same connection if the first answer left it usable
        client.close()
        assert (len(server.seen), server.connections) == (2, connections)

    def test_a_connection_the_server_closed_while_idle_is_replaced_before_use(self, server):
        client = client_of(server)
        client.publish("a.request", "c1", {})
        [idle] = client._publisher._idle
        idle._sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed it: readable at EOF
        client.publish("a.request", "c2", {})
        client.close()
        assert (len(server.seen), server.connections) == (2, 2)


class TestTLS:
    @pytest.fixture
    def authority(self, tmp_path):
        """A self-signed certificate for 127.0.0.1, its key, and the bundle that trusts it."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "events.test")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        server = Recorder(answering(202), tls=context)
        yield server, str(tmp_path / "cert.pem")
        server.close()

    def test_https_is_verified_against_the_private_bundle(self, authority, monkeypatch):
        server, bundle = authority
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", bundle)
        client = EventsClient(f"https://127.0.0.1:{server.port}", TOKEN)
        client.publish("a.request", "c1", {})
        client.close()
        assert server.seen[0][2]["Authorization"] == f"Bearer {TOKEN}"

    def test_an_untrusted_certificate_gets_no_token(self, authority, monkeypatch):
        server, _ = authority
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        client = EventsClient(f"https://127.0.0.1:{server.port}", TOKEN)
        with pytest.raises(EventsUnavailable) as raised:
            client.publish("a.request", "c1", {})
        assert str(raised.value) == "publishing a.request failed: SSLCertVerificationError"
        assert server.seen == []
