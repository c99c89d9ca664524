"""chat.py --web against unlucky settings and rude clients: sampling settings at the ends of their ranges, a
generation that fails, a model thread that dies, clients that hang up at every stage, values of the wrong JSON
type, bodies that do not match their Content-Length, malformed requests, and many connections at once."""

import ctypes
import json
import math
import os
import queue
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import conftest  # noqa: F401 (first: it puts the project on sys.path)
from test_chat import events, health, post, reference, served, tiny_checkpoint  # noqa: F401 (served: a fixture)

import chat
import web
import configurator
import generate
from configurator import UserError


def raw(port, data, half_close=True):
    """Send raw bytes as a request, close our sending side, and return (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/"):  # the answer to an HTTP/0.9 request (one word) has no status line
        return None, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def request(body, headers=None, length=None):
    """The bytes of a POST /api/generate with a JSON (or raw) body and these headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(data)) if length is None else length,
               **(headers or {})}
    lines = ["POST /api/generate HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def assert_one_line_error(status, body, complaint=""):
    """A 4xx (or 5xx) answer: one line of JSON naming the problem, with nothing of Python's own in it."""
    text = body.decode()
    assert (status is None or 400 <= status < 600) and text.endswith("\n") and text.count("\n") == 1, (status, text)
    error = json.loads(text)["error"]
    assert complaint in error and len(error) < 300, error
    for python in ("Traceback", "invalid literal", "Errno", "Exception", "object has no attribute"):
        assert python not in error, error
    return error


# -----------------------------------------------------------------------------
# Settings at the ends of their ranges


@pytest.mark.parametrize("settings, greedy", [
    (dict(temperature=5e-324), True),  # the smallest float there is: 0 in float32
    (dict(temperature=1e-300), True),
    (dict(temperature=1e-40, top_k=3), True),  # a float32 subnormal
    (dict(temperature=9.9e-6, top_p=0.5), True),  # just below generate.GREEDY_BELOW
    (dict(top_p=5e-324), True),  # keeps only the most likely token
    (dict(top_p=1e-300, temperature=100), True),
    (dict(temperature=100, top_k=1_000_000), False),
    (dict(temperature=1e-5, top_k=1), True),  # at GREEDY_BELOW it samples, from one token
])
def test_settings_at_the_ends_of_their_ranges_give_complete_replies_and_the_server_goes_on(served, settings, greedy):
    got = events(post(served["port"], {"prompt": "abc", "length": 40, "seed": 3, **settings}))
    assert got[-1]["done"] and got[-1]["tokens"] == 40
    tokens = [e["token"] for e in got[1:-1]]
    expected = reference(served["model"], served["tok"], "abc", 40, 3, **({"temperature": 0} if greedy else settings))
    assert tokens == expected
    assert health(served["port"])["status"] == "ok"


@pytest.mark.parametrize("name, value", [
    ("temperature", -1e-300), ("temperature", 100.5), ("temperature", math.nan), ("temperature", 5e-324),
    ("temperature", 100.0), ("top_k", -1), ("top_k", 1_000_001), ("top_k", 1_000_000), ("top_p", 0.0),
    ("top_p", 1.0000001), ("top_p", 5e-324), ("top_p", 1.0),
])
def test_generate_py_chat_py_and_the_api_allow_the_same_values_in_the_same_words(served, name, value):
    try:
        rule = generate.check_sampling(name, value) and None
    except UserError as e:
        rule = str(e)
    settings = {k: getattr(chat, k) for k in configurator.setting_names(vars(chat))}  # the fixture's, put back
    try:
        for script in (generate, chat):  # in-process; a missing checkpoint stops a run whose values pass
            with pytest.raises(SystemExit) as stopped:
                script.main([f"--{name}={value!r}", "--init_from=missing.pt", "--device=cpu"])
            if math.isnan(value):
                assert "is not a Python literal" in str(stopped.value)  # a command line takes no NaN at all
            elif rule:
                assert str(stopped.value) == f"error: --{rule}", script
            else:
                assert str(stopped.value).startswith("error: no checkpoint at missing.pt"), script
    finally:
        vars(chat).update(settings)
    status, body = raw(served["port"], request(f'{{"prompt": "a", "length": 2, "{name}": {value!r}}}'
                                               .replace("nan", "NaN").encode()))
    assert (status, json.loads(body)["error"]) == (400, rule) if rule else status == 200


# -----------------------------------------------------------------------------
# Generations that fail, and a model thread that dies


@pytest.mark.parametrize("error, after", [
    (UserError("the model's outputs are not finite numbers (NaN or inf)"), 0),  # in the prompt's pass
    (RuntimeError("out of memory"), 5),
    (SystemExit(1), 3),  # what generate.py's sampler once raised
    (KeyboardInterrupt(), 2),
    (MemoryError(), 0),
])
def test_a_generation_that_fails_tells_its_client_and_the_others_go_on(served, monkeypatch, error, after):
    real, tok, port = web.sample_next, served["tok"], served["port"]
    drawn = []

    def failing(logits, temperature, top_k, top_p, generator):  # the sampler, failing for the generation of seed
        if generator.initial_seed() == 99:  # 99 at its token number `after`, inside the server's own step
            drawn.append(1)
            if len(drawn) == after + 1:
                raise error
        return real(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(web, "sample_next", failing)
    before = health(port)
    other = post(port, {"prompt": "abc", "length": 300, "seed": 1})  # a generation running beside it
    got = events(post(port, {"prompt": "fail", "length": 300, "seed": 99}))  # the seed, `after` tokens, the error
    assert "seed" in got[0] and all("token" in e for e in got[1:-1]) and len(got) == after + 2
    named = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    assert got[-1] == {"error": str(error) if isinstance(error, UserError) else f"the generation failed: {named}"}
    others = events(other)
    assert others[-1]["done"] and [e["token"] for e in others[1:-1]] == reference(served["model"], tok, "abc", 300, 1)
    after_all = health(port)
    assert after_all["status"] == "ok" and after_all["failed"] == before["failed"] + 1
    assert after_all["served"] == before["served"] + 1 and after_all["generating"] == 0


def test_clients_at_once_each_stream_exactly_what_generate_py_makes_for_their_prompt_and_seed(served):
    """Eight generations of different prompts, lengths (some past the block) and settings share the batch, joining
    and leaving at different steps; each streams its own tokens, as generate.py makes them for its seed alone."""
    port, tok = served["port"], served["tok"]
    asks = [dict(prompt="abc" * (i + 1), length=20 + 11 * i, seed=i, temperature=[0.8, 0, 1.3][i % 3],
                 top_k=[0, 5][i % 2], top_p=[1.0, 0.9][i // 4]) for i in range(8)]
    results = [None] * 8

    def client(i):
        time.sleep(0.01 * i)  # arriving one after another, while the earlier ones run
        results[i] = events(post(port, asks[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for ask, got in zip(asks, results):
        expected = reference(served["model"], tok, ask["prompt"], ask["length"], ask["seed"], ask["temperature"],
                             ask["top_k"], ask["top_p"])
        assert got[-1]["done"] and [e["token"] for e in got[1:-1]] == expected, ask


def test_a_forward_pass_that_fails_ends_the_generations_in_it_with_an_error_and_the_server_goes_on(served,
                                                                                                 monkeypatch):
    real, port, failed = web.Batch.logits, served["port"], []

    def logits(batch):
        if not failed and len(batch.contexts) == 2:  # once, when two generations share the pass
            failed.append(1)
            raise RuntimeError("out of memory")
        return real(batch)

    monkeypatch.setattr(web.Batch, "logits", logits)
    before = health(port)
    first = post(port, {"prompt": "abc", "length": 400, "seed": 1})
    time.sleep(0.2)
    second = events(post(port, {"prompt": "xyz", "length": 400, "seed": 2}))
    for got in (events(first), second):
        assert got[-1] == {"error": "the generation failed: RuntimeError: out of memory"}
    assert events(post(port, {"prompt": "abc", "length": 5}))[-1]["done"]
    after = health(port)
    assert after["status"] == "ok" and after["failed"] == before["failed"] + 2 and after["generating"] == 0


def kill(thread):
    """Raise SystemExit inside `thread`, as a bug in it would end it (CPython's PyThreadState_SetAsyncExc)."""
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)) == 1


@pytest.fixture
def own_server(tmp_path):
    """A server of its own for a test that breaks it."""
    model, tok = served_model(tmp_path)
    server = web.Server(("127.0.0.1", 0), model, tok, chat.settings())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def served_model(tmp_path):
    from generate import load_for_sampling

    return load_for_sampling(tiny_checkpoint(tmp_path / "tiny.pt"), "cpu", "float32")


def test_when_the_models_thread_dies_health_says_so_its_client_gets_an_error_and_a_new_thread_serves(own_server):
    port, first = own_server.server_port, own_server.model_thread
    assert health(port)["status"] == "ok"
    kill(first)  # it acts when the thread next runs Python: as a generation wakes it
    own_server.inbox.put(SimpleNamespace(stop=True, steps=iter(()), tokens=queue.SimpleQueue()))
    first.join(timeout=30)
    assert not first.is_alive()
    report = health(port)  # it notices, and starts a new thread
    assert report["status"] == "restarted the model's thread, which had stopped (SystemExit)"
    assert report["restarts"] == 1 and own_server.model_thread.is_alive()
    assert events(post(port, {"prompt": "abc", "length": 5}))[-1]["done"]

    # the next thread dies with a generation in its hands, which waits on it: a bug in its step ends the thread
    # (an exception sent into it instead could land before it is back waiting for work, and so miss the request)
    def broken_step(batch, jobs):
        raise SystemExit

    own_server.step = broken_step
    got = events(post(port, {"prompt": "abc", "length": 50}))
    del own_server.step  # the threads to come step as they should
    assert got[-1] == {"error": "the generation failed: RuntimeError: the model's thread stopped; send the request "
                                "again"}
    report = health(port)
    assert report["status"] == "ok" and report["restarts"] == 2 and report["failed"] == 1
    assert report["generating"] == 0 and events(post(port, {"prompt": "abc", "length": 5}))[-1]["done"]


# -----------------------------------------------------------------------------
# Clients that hang up early, at every stage


def hang_up(sock, reset):
    if reset:  # a reset rather than a goodbye: the server's next read or write fails at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


GENERATE = request({"prompt": "abc", "length": 3000})
STAGES = {  # what the client sends before it hangs up
    "nothing": b"",
    "part of the request line": b"POST /api/gen",
    "the request line": b"POST /api/generate HTTP/1.1\r\n",
    "half the headers": GENERATE[: GENERATE.index(b"Content-Length") + 9],
    "part of the body": GENERATE[:-10],
    "a bad request, without reading the 400": request(b'{"prompt": 7}'),
    "GET /api/model, without reading it": b"GET /api/model HTTP/1.1\r\n\r\n",
    "GET / (the page), without reading it": b"GET / HTTP/1.1\r\n\r\n",
    "a generation, without reading it": GENERATE,
}


def request_threads():
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


def open_files():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_client_that_hangs_up_early_leaves_one_log_line_at_most_and_nothing_behind(served, capfd, stage, reset):
    port = served["port"]
    before = health(port)
    while request_threads():  # the health request's thread, ending
        time.sleep(0.01)
    files = open_files()
    capfd.readouterr()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(STAGES[stage])
    hang_up(sock, reset)
    health(port)  # connections are accepted in turn: by its answer, the one that hung up has its thread
    deadline = time.monotonic() + 60
    while (request_threads() or open_files() != files) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not request_threads() and open_files() == files  # its thread has ended and its connection is closed
    log = [line for line in capfd.readouterr().err.splitlines() if "GET /api/health" not in line]
    assert not any("Traceback" in line or "Exception" in line for line in log) and len(log) <= 1, log
    after = health(port)
    assert after["status"] == "ok" and after["generating"] == 0
    if stage.startswith("a generation"):  # stopped as soon as the server noticed, far short of 3000 tokens
        assert after["stopped"] == before["stopped"] + 1 and after["tokens"] - before["tokens"] < 2000
    assert events(post(port, {"prompt": "abc", "length": 3}))[-1]["done"]


# -----------------------------------------------------------------------------
# Types, lengths and malformed requests


@pytest.mark.parametrize("body, complaint", [
    ({"prompt": "a", "temperature": "0.5"}, 'temperature must be a number, got "0.5"'),
    ({"prompt": "a", "length": "100"}, 'length must be an integer, got "100"'),
    ({"prompt": "a", "length": 100.0}, "length must be an integer, got 100.0"),
    ({"prompt": "a", "top_k": True}, "top_k must be an integer, got true"),
    ({"prompt": "a", "seed": "7"}, 'seed must be an integer, got "7"'),
    ({"prompt": "a", "top_p": None}, "top_p must be a number, got null"),
    ({"prompt": "a", "temperature": [0.5]}, "temperature must be a number, got [0.5]"),
    ({"prompt": "a", "seed": 2**64}, "seed=18446744073709551616 is out of range: give from 0 to 2**63 - 1"),
    ({"prompt": "a", "length": 10**40}, "length=10000000000000000000... is out of range"),
    ({"prompt": ["a"]}, '"prompt", a string'),
])
def test_values_must_have_their_json_type(served, body, complaint):
    assert_one_line_error(*raw(served["port"], request(body)), complaint)


def test_a_whole_number_is_a_number_too(served):
    got = events(post(served["port"], {"prompt": "abc", "temperature": 1, "top_p": 1, "length": 5, "seed": 0}))
    assert [e["token"] for e in got[1:-1]] == reference(served["model"], served["tok"], "abc", 5, 0, temperature=1.0)


@pytest.mark.parametrize("length, complaint", [
    ("abc", "the Content-Length must be a number of bytes, got 'abc'"),
    ("\u00b2", "got '\u00b2'"),  # a digit to str.isdigit(), not to int()
    ("-1", "got '-1'"),
    ("+5", "got '+5'"),
    ("1e3", "got '1e3'"),
    ("0x10", "got '0x10'"),
    ("5 5", "got '5 5'"),
    ("", "got ''"),
    ("9" * 5000, "a Content-Length of at most"),
    ("99999999999999999999", "a Content-Length of at most"),
])
def test_a_malformed_content_length_gets_a_400_in_our_own_words(served, length, complaint):
    assert_one_line_error(*raw(served["port"], request({"prompt": "a"}, length=length)), complaint)


@pytest.mark.parametrize("headers, complaint", [
    ("Content-Length: 16\r\nContent-Length: 16\r\n", "one Content-Length header"),
    ("Transfer-Encoding: chunked\r\nContent-Length: 16\r\n", "no Transfer-Encoding"),
    ("Transfer-Encoding: chunked\r\n", "one Content-Length header"),
])
def test_a_body_whose_length_is_not_one_plain_content_length_gets_400(served, headers, complaint):
    head = f"POST /api/generate HTTP/1.1\r\nContent-Type: application/json\r\n{headers}\r\n".encode()
    assert_one_line_error(*raw(served["port"], head + b'{"prompt": "ab"}'), complaint)


@pytest.mark.parametrize("missing", [1, 10, 1000])
def test_a_body_shorter_than_its_content_length_gets_400_even_when_what_came_is_json(served, missing):
    body = json.dumps({"prompt": "abc", "length": 3}).encode()  # a whole request: served if taken on trust
    data = request(body, length=str(len(body) + missing))
    assert_one_line_error(*raw(served["port"], data),
                          f"the body ended after {len(body)} of the {len(body) + missing} bytes its Content-Length")


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", None),  # HTTP/0.9 (one word): an answer without a status line
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/9.9\r\n\r\n", None),  # a version it cannot read: answered as HTTP/0.9 too
    (b"GET / HTTP/1.x\r\n\r\n", None),
    (b"BREW /api/generate HTTP/1.1\r\n\r\n", 501),
    (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"POST /api/health HTTP/1.1\r\n\r\n", 404),
    (request({"prompt": "a"}, {"Content-Type": "text/plain"}), 400),
])
def test_every_error_answer_is_one_line_of_json(served, data, status):
    got, body = raw(served["port"], data)
    assert got == status
    assert_one_line_error(got, body)


# -----------------------------------------------------------------------------
# Many connections at once


def test_a_burst_of_connections_waits_to_be_accepted_rather_than_being_dropped(tmp_path):
    model, tok = served_model(tmp_path)
    server = web.Server(("127.0.0.1", 0), model, tok, chat.settings())  # listening, but accepting nothing yet
    assert server.request_queue_size >= max(128, 2 * chat.max_streams)  # as web.py's Server promises
    clients = []
    try:
        for _ in range(server.request_queue_size):  # one dropped would wait for a retry that never comes
            clients.append(socket.create_connection(("127.0.0.1", server.server_port), timeout=10))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for sock in clients:
            sock.sendall(b"GET /api/health HTTP/1.1\r\n\r\n")
        for sock in clients:
            assert sock.makefile("rb").readline().split()[1] == b"200"
    finally:
        for sock in clients:
            sock.close()
        server.shutdown()
        server.server_close()
