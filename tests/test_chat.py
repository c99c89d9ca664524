"""chat.py --web: the API against a server on a free port (tokens as generate.py makes them, bad requests,
clients that leave, clients at once) and the page in a real headless Chromium. The terminal chat is in
test_chat_terminal.py.

Run as a script, this file's browser code takes the README's screenshot of a running server's page:

    python chat.py --web &
    python tests/test_chat.py http://127.0.0.1:8000/ "ROMEO:" docs/chat.png
"""

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time

import pytest
import torch

from conftest import ROOT, oracle, run_script  # first: it puts the project on sys.path, also for the script

import chat
import web
import configurator
from generate import generate, load_for_sampling
from gpt import GPT, GPTConfig
from tokenizer import BPETokenizer, CharTokenizer

PRINTABLE = "\n" + "".join(chr(i) for i in range(32, 127))  # printable ASCII: HTML's <, >, = and " included
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INJECTION = "<img src=x onerror=alert(1)>"
MARKUP = ["<img src=x onerror=alert(1)>", "<script>", "alert(2)", "</script>", "<b>", "</b>", "&amp;", "&lt;", "&gt;",
          '<a href="javascript:alert(3)">', "</a>", "<!-- -->", "<div>", "\n"]  # HTML, which a page must show as text


def tiny_checkpoint(path, chars=PRINTABLE, block_size=32, n_layer=2, n_head=2, n_embd=32):
    """A train.py-style checkpoint of a small random GPT over the characters `chars`; returns its path."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=len(chars), n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                    tokenizer=CharTokenizer(chars).to_dict()), path)
    return str(path)


def markup_checkpoint(path):
    """A checkpoint of a GPT whose every next token is one of MARKUP, drawn at random: its BPE makes each of them
    one token, its final LayerNorm gives out one fixed vector, and the (tied) embedding table turns that into a
    high logit for those tokens and a low one for all the others."""
    tok = BPETokenizer.train("".join(MARKUP) * 20, 1000, special_tokens=(), pattern=r"<[^>]*>|&[a-z]+;|[^<&]+|[<&]")
    ids = [tok.encode(piece) for piece in MARKUP]
    assert all(len(i) == 1 for i in ids)  # each a token of its own
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.eye(16)[0])  # every position's output: (1, 0, ..., 0)
        model.transformer.wte.weight[:, 0] = -10.0
        model.transformer.wte.weight[[i[0] for i in ids], 0] = 10.0
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                    tokenizer=tok.to_dict()), path)
    return str(path)


def reference(model, tok, prompt, length, seed, temperature=0.8, top_k=0, top_p=1.0):
    """The token ids generate.py's own loop makes for one prompt and seed."""
    idx = torch.tensor([tok.encode(prompt)])
    generator = torch.Generator().manual_seed(seed)
    return [t.item() for t in generate(model, idx, length, temperature, top_k, top_p, generator)]


@contextlib.contextmanager
def serving(path, *settings):
    """A chat.py server on a free port, in a thread of this process, serving the checkpoint at `path` with these
    command-line settings; yields dict(port, path, model, tok)."""
    configurator.configure(vars(chat), [f"--init_from={path}", "--device=cpu", *settings])
    model, tok = load_for_sampling(path, "cpu", "float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, and the tests share the cores
    server = web.Server(("127.0.0.1", 0), model, tok, chat.settings())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield dict(port=server.server_port, path=path, model=model, tok=tok)
    finally:
        server.shutdown()
        server.server_close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A chat.py server serving a tiny model."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny.pt")
    with serving(path, "--max_length=3000", "--max_prompt=200", "--max_streams=8") as server:
        yield server


def post(port, body, content_type="application/json", length=None):
    """POST /api/generate with raw bytes (or a dict as JSON); returns the open response."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("POST", "/api/generate")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(len(data)) if length is None else length)
    connection.endheaders(data)
    return connection.getresponse()


def events(response, times=None):
    """The server-sent events of a streamed response, as dicts, read as they arrive until the server closes it;
    the time each arrived is appended to `times` if given."""
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    got = []
    while line := response.fp.readline():
        assert line.startswith(b"data: ") and response.fp.readline() == b"\n", line
        got.append(json.loads(line[6:]))
        if times is not None:
            times.append(time.perf_counter())
    return got


def get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read()


def health(port):
    status, _, body = get(port, "/api/health")
    assert status == 200
    return json.loads(body)


def test_the_real_chat_py_web_serves_with_the_settings_its_command_line_gave(tmp_path):
    """`python chat.py --web` runs chat.py as __main__, and web.py's server takes the settings from it: a length
    above the default --max_length of 2000 is accepted when --max_length allows it, and the limits say so."""
    import subprocess

    path = tiny_checkpoint(tmp_path / "tiny.pt")
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), "--web", "--port=0", "--device=cpu",
                               f"--init_from={path}", "--max_length=2500", "--max_prompt=50", "--temperature=0.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [server.stdout.readline(), server.stdout.readline()]
        port = int(re.search(r"serving http://127.0.0.1:(\d+)/", lines[1])[1])
        info = json.loads(get(port, "/api/model")[2])
        assert info["limits"] == {"max_prompt": 50, "max_length": 2500, "max_streams": 32}
        assert info["defaults"]["temperature"] == 0.5 and info["init_from"] == str(path) and str(path) in lines[0]
        got = events(post(port, {"prompt": "abc", "length": 2100, "seed": 1}))
        assert got[-1]["done"] and got[-1]["tokens"] == 2100
        response = post(port, {"prompt": "abc", "length": 2501})
        assert response.status == 400 and "from 1 to 2500" in json.loads(response.read())["error"]
    finally:
        server.terminate()
        server.wait(timeout=30)


# -----------------------------------------------------------------------------
# The API


def test_streamed_tokens_are_the_ones_generate_py_makes_for_the_same_prompt_seed_and_settings(served, tmp_path):
    prompt = 'Say "<b>hi</b>" & go on, past the end of the 32-position block.'  # longer than block_size: cropped
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, length=50, seed=7)
    got = events(post(served["port"], {"prompt": prompt, **settings}))
    assert got[0] == {"seed": 7, "prompt_tokens": len(prompt)}
    assert got[-1]["done"] and got[-1]["tokens"] == 50 and len(got) == 52
    text = "".join(e["text"] for e in got[1:-1])
    result = run_script("generate.py", f"--init_from={served['path']}", f"--prompt={prompt}", "--seed=7",
                        "--max_new_tokens=50", "--temperature=0.9", "--top_k=40", "--top_p=0.95", "--device=cpu",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + text + "\n"
    expected = reference(served["model"], served["tok"], prompt, 50, 7, 0.9, 40, 0.95)
    assert [e["token"] for e in got[1:-1]] == expected


def test_a_request_without_a_seed_gets_a_random_one_and_says_which(served):
    first, second = (events(post(served["port"], {"prompt": "abc", "length": 30})) for _ in range(2))
    assert first[0]["seed"] != second[0]["seed"]
    for got in (first, second):
        tokens = [e["token"] for e in got[1:-1]]
        assert tokens == reference(served["model"], served["tok"], "abc", 30, got[0]["seed"])


@pytest.mark.parametrize("body, complaint", [
    (b"{", "not JSON"),
    (b'{"prompt": "\xff"}', "not JSON"),  # not UTF-8
    (b"[" * 3000, "not JSON"),  # nested deeper than the parser goes
    (b"[1, 2]", "must be a JSON object"),
    ({}, '"prompt"'),
    ({"prompt": 7}, '"prompt"'),
    ({"prompt": ""}, '"prompt"'),
    ({"prompt": "a" * 201}, "at most 200"),
    ({"prompt": "café"}, "outside this model's vocabulary: 'é'"),
    ({"prompt": "a", "temprature": 1}, "unknown field 'temprature'"),
    ({"prompt": "a", "temperature": -1}, "temperature=-1 is out of range"),
    ({"prompt": "a", "temperature": "hot"}, "temperature must be a number"),
    ({"prompt": "a", "temperature": True}, "temperature must be a number"),
    ({"prompt": "a", "top_k": 2.5}, "top_k must be an integer"),
    ({"prompt": "a", "top_p": 0}, "top_p=0 is out of range"),
    ({"prompt": "a", "top_p": 1.5}, "top_p=1.5 is out of range"),
    ({"prompt": "a", "length": 0}, "length=0 is out of range"),
    ({"prompt": "a", "length": 3001}, "from 1 to 3000"),
    ({"prompt": "a", "seed": -1}, "seed=-1 is out of range"),
    (b'{"prompt": "a", "temperature": NaN}', "temperature=nan is out of range"),
])
def test_a_bad_request_gets_400_and_one_line_of_json_and_the_server_goes_on(served, body, complaint):
    response = post(served["port"], body)
    assert response.status == 400 and response.getheader("Content-Type") == "application/json"
    reply = response.read().decode()
    assert reply.count("\n") == 1 and reply.endswith("\n") and complaint in json.loads(reply)["error"], reply
    assert health(served["port"])["status"] == "ok"
    assert len(events(post(served["port"], {"prompt": "a", "length": 3}))) == 5


@pytest.mark.parametrize("content_type, length, complaint", [
    ("text/plain", None, "Content-Type: application/json"),  # what a form on another site could send
    ("application/json", "1000000000", "Content-Length of at most"),  # declared, never sent: not waited for
    ("application/json", "abc", "Content-Length"),
])
def test_a_request_that_is_not_plain_json_of_a_sane_size_gets_400(served, content_type, length, complaint):
    response = post(served["port"], {"prompt": "a"}, content_type, length)
    assert response.status == 400 and complaint in json.loads(response.read())["error"]
    assert health(served["port"])["status"] == "ok"


def test_a_method_the_server_does_not_serve_gets_a_json_error_too(served):
    connection = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    connection.request("DELETE", "/api/generate")
    response = connection.getresponse()
    assert response.status == 501 and response.getheader("Content-Type") == "application/json"
    assert json.loads(response.read()) == {"error": "Unsupported method ('DELETE')"}


def test_the_server_serves_the_page_and_the_api_and_no_files(served):
    status, kind, page = get(served["port"], "/")
    assert status == 200 and kind == "text/html; charset=utf-8" and b"<script>" in page
    status, kind, body = get(served["port"], "/api/model")
    info = json.loads(body)
    assert info["init_from"] == served["path"] and info["vocab_size"] == len(PRINTABLE)
    assert info["parameters"] == served["model"].num_params() and info["limits"]["max_length"] == 3000
    for path in ("/tiny.pt", served["path"], "/../../etc/passwd", "/chat.py", "/api/../chat.py", "/api"):
        status, kind, body = get(served["port"], path)
        assert status == 404 and kind == "application/json" and b"error" in body, path


def test_a_client_that_goes_away_stops_its_generation(served):
    port = served["port"]
    before = health(port)
    response = post(port, {"prompt": "abc", "length": 3000})
    for _ in range(3):  # the seed, then two tokens: it is generating
        assert response.fp.readline().startswith(b"data: ") and response.fp.readline() == b"\n"
    response.close()  # hang up
    for _ in range(100):
        after = health(port)
        if after["generating"] == 0:
            break
        time.sleep(0.05)
    assert after["generating"] == 0 and after["stopped"] == before["stopped"] + 1
    assert after["served"] == before["served"]
    assert 2 <= after["tokens"] - before["tokens"] < 1000  # of the 3000 asked for


def test_clients_at_once_each_get_their_own_complete_answer_and_are_served_side_by_side(served):
    asks = [(f"client {i} says", 11 * i, 200) for i in range(5)]

    def ask(prompt, seed, length):
        times = []
        got = events(post(served["port"], {"prompt": prompt, "seed": seed, "length": length}), times)
        assert got[-1] == {"done": True, "tokens": length, **{k: got[-1][k] for k in ("seconds", "tokens_per_s")}}
        return [e["token"] for e in got[1:-1]], times[1], times[-1]  # the tokens, when the first and last came

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: ask(*a), asks))
    for (prompt, seed, length), (tokens, _, _) in zip(asks, answers):
        assert tokens == reference(served["model"], served["tok"], prompt, length, seed)
    assert max(first for _, first, _ in answers) < min(last for _, _, last in answers)  # side by side, not queued


def test_more_streams_than_allowed_get_503_until_one_ends(served):
    port = served["port"]
    streams = [post(port, {"prompt": "abc", "length": 3000}) for _ in range(8)]  # --max_streams=8
    try:
        assert all(s.status == 200 for s in streams)
        response = post(port, {"prompt": "abc", "length": 3})
        assert response.status == 503 and "busy" in json.loads(response.read())["error"]
    finally:
        for s in streams:
            s.close()
    for _ in range(100):
        if health(port)["generating"] == 0:
            break
        time.sleep(0.05)
    assert len(events(post(port, {"prompt": "abc", "length": 3}))) == 5


# -----------------------------------------------------------------------------
# The page, in a real browser


def chromium(width=900, height=640):
    """Headless Chromium (Debian's chromium and chromium-driver) through selenium; skipped where either is
    missing, except on CI."""
    webdriver = oracle("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing on CI; .ci/run installs them")
        pytest.skip("no chromium here: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))


def open_page(browser, url, prompt, length):
    """Load the page, wait for the model's description, and fill in the prompt and the length."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 10).until(lambda b: "parameters" in b.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "length").clear()
    browser.find_element(By.ID, "length").send_keys(str(length))
    return lambda element_id: browser.find_element(By.ID, element_id)


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def test_the_page_shows_the_text_growing_as_it_is_made_and_html_as_plain_text(served, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    element = open_page(browser, f"http://127.0.0.1:{served['port']}/", INJECTION, 3000)
    element("generate").click()
    seen = []
    while len(set(seen)) < 4 and len(seen) < 400:  # read the text as it grows
        seen.append(len(element("output").get_attribute("textContent")))
        time.sleep(0.02)
    element("stop").click()
    status = element("status")
    for _ in range(100):
        if "stopped after" in status.text:
            break
        time.sleep(0.05)
    assert "stopped after" in status.text
    assert len(set(seen)) >= 4 and seen == sorted(seen)  # several reads, each longer: it streams
    text = element("output").get_attribute("textContent")
    assert text.startswith(INJECTION) and len(INJECTION) < len(text) < len(INJECTION) + 3000
    assert browser.find_elements(By.TAG_NAME, "img") == []  # the prompt was shown as text, not made an element
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert "tokens" in element("model").text and element("generate").is_enabled()


def test_the_page_shows_a_models_markup_as_the_text_it_is(tmp_path, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    model, tok = load_for_sampling(markup_checkpoint(tmp_path / "markup.pt"), "cpu", "float32")
    expected = tok.decode(reference(model, tok, "<", 300, seed=7, temperature=1.0))
    assert len(re.findall("<[a-z/!]", expected)) > 100  # tags and comments, to HTML
    server = web.Server(("127.0.0.1", 0), model, tok, chat.settings())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        element = open_page(browser, f"http://127.0.0.1:{server.server_port}/", "<", 300)
        element("temperature").clear()
        element("temperature").send_keys("1")
        element("seed").send_keys("7")
        element("generate").click()
        wait_for_status(element, "tokens/s (seed 7)", 600, 0.05)
        assert element("output").get_attribute("textContent") == "<" + expected
        assert [e.tag_name for e in browser.find_elements(By.CSS_SELECTOR, "#output *")] == ["span", "span"]
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_shows_a_bad_request_as_the_servers_one_line(served, browser):
    element = open_page(browser, f"http://127.0.0.1:{served['port']}/", "café", 10)
    element("generate").click()
    for _ in range(100):
        if element("status").text:
            break
        time.sleep(0.05)
    assert element("status").text.startswith("error: the text has characters outside this model's vocabulary")


def wait_for_status(element, text, tries, pause):
    """Until the page's status line shows `text` (a finished generation), or `tries` looks `pause` seconds apart."""
    for _ in range(tries):
        if text in element("status").text:
            return
        time.sleep(pause)


def screenshot(url, prompt, path, length=300):
    """Generate `length` tokens from `prompt` on the page at `url` and save a PNG of it to `path`."""
    browser = chromium(width=820, height=680)
    try:
        element = open_page(browser, url, prompt, length)
        element("seed").send_keys("7")
        element("generate").click()
        wait_for_status(element, "tokens/s (seed", 600, 0.1)
        browser.save_screenshot(path)
    finally:
        browser.quit()


if __name__ == "__main__":
    screenshot(*sys.argv[1:4])
