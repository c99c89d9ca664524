"""
web.py: chat.py --web, the talk of chat.py behind a page in the browser and a JSON API, for several clients at
once. chat.py reads the settings and loads the model, then runs serve() here.

    python chat.py --web                             # a page at http://127.0.0.1:8000
    python chat.py --web --port=8080 --host=0.0.0.0  # reachable from other machines: only on a network you trust

Python's own http.server serves one page (chat.html, beside this file: no CDN, works offline) and a JSON API
beside it:

    GET  /api/health     {"status": "ok", "generating": 1, "served": 12, "stopped": 1, "failed": 0, "tokens": 2600,
                          "restarts": 0}
    GET  /api/model      what is loaded: name, parameters, block_size, tokenizer, "chat": true for a chat model,
                         device, defaults and limits
    POST /api/generate   {"prompt": "ROMEO:", "temperature": 0.8, "top_k": 0, "top_p": 1.0, "length": 200,
                          "seed": 7}, Content-Type: application/json -> server-sent events as the tokens are made:
                         data: {"seed": 7, "prompt_tokens": 6}, then one data: {"token": 1, "text": "\\n"} per
                         token, then data: {"done": true, "tokens": 200, "seconds": 0.4, "tokens_per_s": 500.0},
                         or data: {"error": "..."} if the generation fails
                         A chat model takes "messages" instead of "prompt": [{"role": "system", "content": "Be
                         brief."}, {"role": "user", "content": "Hi"}, ...]: roles system (first only), user and
                         assistant, the last the user's, at most --max_prompt characters in all. The oldest turns
                         that do not fit go, as in the terminal: the first event says how many messages
                         ("dropped": 2), and the done event why the reply ended: "stop": "end" at the model's <|end|>
                         (never sent as a token), "length" at the length. The tokens are generate.py's for the
                         rendered prompt and seed, up to the first <|end|>. A base model refuses "messages", and a
                         chat model "prompt".

Settings a request leaves out are the server's; without a seed it gets a random one (the first event names it). The
same prompt, seed and settings give exactly the tokens `python generate.py` gives, and the same values are allowed
(generate.check_sampling; a temperature below 1e-5 is greedy). A bad request gets HTTP 400 and one line of JSON:
numbers must be JSON numbers (integers for top_k, length, seed), and the body exactly Content-Length bytes. Several
clients are served at once, batched: one thread runs the model for all of them, and each forward pass makes the next
token of every running generation (generate.Batch: a row each, with its own length, cache rows, settings and random
generator). A new request is read into its row and joins at the next pass; one that ends, or whose client goes away
at any stage, leaves at once, with one log line. Should the model's thread ever stop, the request it held gets an
error and a fresh thread serves the next (/api/health counts the restarts). The model is chosen when the server
starts, never by a client; the server listens on 127.0.0.1 (this machine only) unless --host says otherwise, and
only takes JSON POSTs, which a page from another site cannot send without a permission (CORS) this server never
grants.
"""

import base64
import hashlib
import json
import os
import queue
import random
import re
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import torch

from chat import SAMPLING, checked, conversation_prompt, describe, encode
from configurator import UserError
from generate import Batch, sample_next, text_decoder
from tokenizer import ROLES, ChatTokenizer

# -----------------------------------------------------------------------------
# The server: a thread for each request, and one thread that runs the model for all of them


class Server(ThreadingHTTPServer):
    """The HTTP server and the model it serves. Each request has a thread of its own that reads it and writes the
    answer; one more thread runs the model for all of them (run_model)."""

    daemon_threads = True  # Ctrl-C does not wait for open streams

    def __init__(self, address, model, tok, settings):
        # connections waiting to be accepted: room for a burst of clients at once (socketserver's 5 drops some)
        self.request_queue_size = max(128, 2 * settings.max_streams)
        super().__init__(address, Handler)
        self.model, self.tok, self.settings = model, tok, settings
        self.inbox = queue.SimpleQueue()  # new generations, for the model's thread
        self.lock = threading.Lock()  # guards the counts and the model's thread
        self.counts = {"generating": 0, "served": 0, "stopped": 0, "failed": 0, "tokens": 0, "restarts": 0}
        weight = model.lm_head.weight
        self.info = {"init_from": settings.init_from, "parameters": model.num_params(),
                     "block_size": model.config.block_size,
                     "vocab_size": tok.vocab_size, "tokenizer": type(tok).__name__, "device": str(weight.device),
                     "chat": isinstance(tok, ChatTokenizer),
                     "dtype": str(weight.dtype).removeprefix("torch."),
                     "defaults": {name: getattr(settings, name) for name in SAMPLING if name != "seed"},
                     "limits": {name: getattr(settings, name) for name in ("max_prompt", "max_length", "max_streams")}}
        self.model_thread, self.model_failure = None, ""
        self.model_thread_running()

    def model_thread_running(self):
        """True if the model's thread is running. If it has stopped (only a bug, or an exception sent into it, can
        stop it), start a fresh one for the generations to come and return False."""
        with self.lock:
            if self.model_thread is not None and self.model_thread.is_alive():
                return True
            if self.model_thread is not None:
                self.counts["restarts"] += 1
                print(f"the model's thread stopped ({self.model_failure}); a new one takes the next generations",
                      file=sys.stderr, flush=True)
            self.model_thread = threading.Thread(target=self.run_model, daemon=True)
            self.model_thread.start()
            return False

    def run_model(self):
        """Continuous batching: every running generation is a row of one generate.Batch, and one forward pass
        gives each its next token, which goes to its request's queue (None at the end, or the exception that
        ended it). A new generation joins between two passes (its prompt read into its row first); a finished or
        abandoned one leaves at once. One thread owns the model: PyTorch keeps one set of worker threads rather
        than one per request, which on a small CPU only compete."""
        try:
            batch, jobs = Batch(self.model, rows=self.settings.max_streams), []
            while True:
                waiting = [self.inbox.get()] if not jobs else []  # nothing to do: wait for a generation
                while not self.inbox.empty():
                    waiting.append(self.inbox.get())
                for job in waiting:
                    if job.stop:  # its client left before it started
                        job.tokens.put(None)
                    else:
                        batch.add(job.ids)
                        jobs.append(job)
                if jobs:
                    self.step(batch, jobs)
        except BaseException as e:  # the thread ends; the requests waiting on it notice (Handler.next_token)
            self.model_failure = named(e)

    def step(self, batch, jobs):
        """One forward pass for every row, each row's token sampled with its own settings and generator and handed
        to its request; the rows that end leave the batch (the last row taking each one's place, as in jobs)."""
        try:
            with torch.inference_mode():
                logits = batch.logits()  # (B, V)
            outcomes = [self.sample(job, logits[i : i + 1]) for i, job in enumerate(jobs)]
        except BaseException as e:  # the pass itself failed: every generation in it ends with the error
            traceback.print_exception(e)
            outcomes = [e] * len(jobs)
        batch.append([t if isinstance(t, int) else 0 for t in outcomes])
        for i in reversed(range(len(jobs))):
            job, outcome = jobs[i], outcomes[i]
            if isinstance(outcome, int) and outcome == job.end:  # a chat model's <|end|>: the reply is complete,
                job.ended, outcome = "end", None  # and the token is not sent
            job.tokens.put(outcome)
            if isinstance(outcome, int):
                job.made += 1
                with self.lock:
                    self.counts["tokens"] += 1
            if not isinstance(outcome, int) or job.made == job.settings["length"]:
                if isinstance(outcome, int):
                    job.tokens.put(None)  # its last token: the end
                batch.remove(i)
                jobs[i] = jobs[-1]
                jobs.pop()

    def sample(self, job, logits):
        """The job's next token (an int) from its row's logits (1, V); None if its client has gone; the exception,
        if sampling fails (it ends that generation only)."""
        if job.stop:
            return None
        try:
            s = job.settings
            return sample_next(logits, s["temperature"], s["top_k"], s["top_p"], job.generator).item()
        except BaseException as e:
            if not isinstance(e, UserError):  # not a user's mistake: a bug, which the log shows
                traceback.print_exception(e)
            return e

    def handle_error(self, request, client_address):  # what a request's thread left unhandled: a traceback,
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # but a client leaving is no news
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """One request: the page, the health or model report, or a generation streamed as server-sent events."""

    timeout = 60  # seconds a client may stall a read or a write before it counts as gone
    server_version, sys_version = "chat.py", ""  # the Server header names no Python version

    def handle_one_request(self):
        """http.server's reading and answering of one request, logged in one line when it ends, and quiet when the
        client hangs up at any stage: before sending anything, within its headers or body, or before reading the
        answer. (Its thread then ends, which closes the connection.)"""
        self.status, self.note = None, ""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):  # hung up (BrokenPipe, ConnectionReset) or stalled past `timeout`
            self.close_connection = True
            self.note = self.note or "the client went away"
        if self.status or self.note:
            line = f'"{getattr(self, "requestline", "")[:200]}" {self.status or "-"}'
            self.log_message("%s", f"{line}: {self.note}" if self.note else line)

    def log_request(self, code="-", size="-"):  # http.server calls this as it sends the status: kept for the
        self.status = getattr(code, "value", code)  # one line that handle_one_request logs at the end

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            self.send(200, PAGE.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
        elif path == "/api/health":
            running = self.server.model_thread_running()
            with self.server.lock:
                counts = dict(self.server.counts)
            stopped = f"restarted the model's thread, which had stopped ({self.server.model_failure})"
            self.send_json(200, {"status": "ok" if running else stopped, **counts})
        elif path == "/api/model":
            self.send_json(200, self.server.info)
        else:
            self.send_json(404, {"error": f"nothing at {path[:100]}; the page is at / and the API under /api/"})

    def do_POST(self):
        if self.path != "/api/generate":
            return self.send_json(404, {"error": f"nothing to POST at {self.path[:100]}; use /api/generate"})
        try:
            ids, settings, dropped = read_request(self.headers, self.rfile, self.server.tok,
                                                  self.server.model.config.block_size, self.server.settings)
        except ValueError as e:
            return self.send_json(400, {"error": str(e)})
        with self.server.lock:
            busy = self.server.counts["generating"] >= self.server.settings.max_streams
            self.server.counts["generating"] += not busy
        if busy:
            most = self.server.settings.max_streams
            return self.send_json(503, {"error": f"busy: {most} generations are running (--max_streams); "
                                                 f"try again shortly"})
        self.stream(ids, settings, dropped)

    def stream(self, ids, settings, dropped=None):
        """Send the reply's tokens as server-sent events while they are made; stop when the client goes away.
        dropped: for a chat model's reply, the number of oldest messages its prompt left out (else None)."""
        server, turns = self.server, dropped is not None
        generator = torch.Generator(server.model.lm_head.weight.device).manual_seed(settings["seed"])
        job = SimpleNamespace(ids=ids, settings=settings, generator=generator, tokens=queue.SimpleQueue(), made=0,
                              stop=False, end=server.tok.end if turns else None, ended="length")
        # a row of the model thread's batch, with a random generator of its own; `end` ends it (a chat model's)
        server.model_thread_running()
        job.thread = server.model_thread  # the thread that takes it from the inbox
        server.inbox.put(job)
        decode, made, outcome, t0 = text_decoder(server.tok), 0, "stopped", time.perf_counter()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.event({"seed": settings["seed"], "prompt_tokens": len(ids),
                        **({"dropped": dropped} if turns else {})})
            while isinstance(token := self.next_token(job), int):
                tokens = [token]  # and those that came while this thread waited for its turn: one write for all
                while not job.tokens.empty() and isinstance(token := job.tokens.get(), int):
                    tokens.append(token)
                made += len(tokens)
                self.event(*({"token": t, "text": decode(t)} for t in tokens))
                if not isinstance(token, int):  # the end (None), or the error, came right after them
                    break
            if token is None:
                seconds = time.perf_counter() - t0
                self.event({"done": True, "tokens": made, "seconds": round(seconds, 3),
                            "tokens_per_s": round(made / seconds, 1), **({"stop": job.ended} if turns else {})})
                outcome = "served"
            else:
                outcome, self.note = "failed", f"failed after {made} tokens: {failure(token)}"
                self.event({"error": failure(token)})
        except (ConnectionError, TimeoutError):  # the client left (or stalled): stop its generation
            self.note = f"stopped after {made} tokens: the client went away"
        finally:
            job.stop = True  # the model's thread drops it at its next turn, if it is still running
            with server.lock:
                server.counts["generating"] -= 1
                server.counts[outcome] += 1

    def next_token(self, job):
        """The job's next token from the model's thread: an int, None at its end, or the exception that ended it."""
        while True:
            try:
                return job.tokens.get(timeout=1)
            except queue.Empty:  # a long step, or a thread that has stopped and will never answer
                if not job.thread.is_alive():
                    self.server.model_thread_running()  # a fresh thread for the generations to come
                    return RuntimeError("the model's thread stopped; send the request again")

    def event(self, *events):
        self.wfile.write("".join(f"data: {json.dumps(data)}\n\n" for data in events).encode())

    def send_json(self, status, data):
        self.send(status, json.dumps(data).encode() + b"\n", "application/json")

    def send(self, status, body, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):  # http.server's own errors (a malformed request line,
        self.close_connection = True  # an unknown method) as one-line JSON too
        self.send_json(code, {"error": (message or HTTPStatus(code).phrase)[:200]})


def failure(error):
    """What ended a generation, in one line for its client: a UserError's message, or the exception."""
    text = str(error) if isinstance(error, UserError) else f"the generation failed: {named(error)}"
    return " ".join(text.split())[:300]


def named(error):
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def read_request(headers, body, tok, block_size, config):
    """A POST /api/generate -> (the prompt's token ids, the settings, and for a chat model the number of oldest
    messages its prompt leaves out, else None); ValueError with a one-line reason if bad. config: the server's
    settings (its defaults and limits)."""
    max_prompt = config.max_prompt
    if headers.get_content_type() != "application/json":
        raise ValueError('send the request as JSON, with "Content-Type: application/json"')
    most = 12 * max_prompt + 1000  # one character is at most 12 bytes of JSON (an escaped surrogate pair)
    sizes = headers.get_all("Content-Length") or []
    if headers.get("Transfer-Encoding") or len(sizes) != 1:
        raise ValueError(f"send the body with one Content-Length header of at most {most} bytes (prompts: at most "
                         f"{max_prompt} characters), and no Transfer-Encoding")
    size = sizes[0].strip()
    if not re.fullmatch("[0-9]+", size):
        raise ValueError(f"the Content-Length must be a number of bytes, got {size[:20]!r}")
    if len(size) > 12 or int(size) > most:
        raise ValueError(f"the request needs a Content-Length of at most {most} bytes (prompts: at most "
                         f"{max_prompt} characters)")
    data = body.read(int(size))
    if len(data) < int(size):
        raise ValueError(f"the body ended after {len(data)} of the {size} bytes its Content-Length promised; "
                         f"send all of them")
    try:
        request = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        raise ValueError('the request is not JSON; send an object like {"prompt": "ROMEO:", "length": 100}')
    if not isinstance(request, dict):
        raise ValueError('the request must be a JSON object like {"prompt": "ROMEO:", "length": 100}')
    turns = isinstance(tok, ChatTokenizer)
    field = "messages" if turns else "prompt"
    unknown = sorted(set(request) - {field, *SAMPLING})
    if "prompt" in unknown:
        raise ValueError('this is a chat model: send "messages", the conversation, like '
                         '[{"role": "user", "content": "Hi"}], rather than "prompt"')
    if "messages" in unknown:
        raise ValueError('this model continues text, and takes no "messages" (a chat model does): send the text '
                         'as "prompt"')
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:40]!r}; the fields are {field}, {', '.join(SAMPLING)}")
    defaults = {name: getattr(config, name) for name in SAMPLING} | {"seed": random.randrange(2**31)}
    if turns:
        messages = checked_messages(request.get("messages"), max_prompt)
        settings = {name: checked(name, request.get(name, defaults[name]), config.max_length) for name in SAMPLING}
        ids, dropped = conversation_prompt(tok, messages, settings["length"], block_size)  # the oldest turns go
        return ids, settings, dropped
    prompt = request.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('give the text to continue as "prompt", a string that is not empty')
    if len(prompt) > max_prompt:
        raise ValueError(f"the prompt has {len(prompt)} characters; at most {max_prompt} are accepted")
    settings = {name: checked(name, request.get(name, defaults[name]), config.max_length) for name in SAMPLING}
    return encode(tok, prompt), settings, None


def checked_messages(messages, max_prompt):
    """A request's "messages" if they are a conversation a chat model can answer, else ValueError saying why: a
    list of {"role", "content"}, a system message first if any, the user's last, at most max_prompt characters."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('give the conversation as "messages", a list that is not empty, like '
                         '[{"role": "user", "content": "Hi"}]')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'message {i} must be an object with a "role" and a "content" and nothing else, like '
                             f'{{"role": "user", "content": "Hi"}}')
        if message["role"] not in ROLES or message["role"] == "system" and i > 0:
            raise ValueError(f"message {i} has the role {json.dumps(message['role'])[:40]}; the roles are "
                             f"{', '.join(ROLES)}, and only the first message may be the system's")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}'s content must be a string, got {json.dumps(message['content'])[:40]}")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's: it is the one the model answers")
    if (size := sum(len(message["content"]) for message in messages)) > max_prompt:
        raise ValueError(f"the messages have {size} characters; at most {max_prompt} are accepted")
    return messages


def serve(model, tok, settings):
    """Serve the page and the API until Ctrl-C. settings: chat.py's (chat.settings())."""
    host, port = settings.host, settings.port
    try:
        server = Server((host, port), model, tok, settings)
    except OSError as e:  # the port is taken, or the host is not one of this machine's addresses
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"cannot listen on {host}:{port} ({reason}); pick another --port (0: any free one) "
                        f"or --host")
    print(f"{describe(model, tok, settings.init_from)}\nserving http://{host}:{server.server_port}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print()
    finally:
        server.server_close()


# -----------------------------------------------------------------------------
# The page, chat.html: plain HTML and JavaScript. The model's text goes in as text (append, textContent), never as
# HTML, and the Content-Security-Policy lets only the page's own script and style run: no other script, no inline
# handler such as onerror=..., no image, no request except to this server.

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html"), encoding="utf-8") as f:
    PAGE = f.read()


def content_security_policy(page):
    """Allow exactly the page's own inline <script> and <style> (by their SHA-256), and requests to this server."""
    def digest(tag):
        inline = re.search(f"<{tag}>(.*?)</{tag}>", page, re.S)[1]
        return base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest('script')}'; style-src 'sha256-{digest('style')}'; "
            f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


CSP = content_security_policy(PAGE)
