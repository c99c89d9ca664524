"""chat.py with a chat model (a ChatTokenizer's turns): the terminal takes turns and carries the conversation, the
API takes "messages" and stops at <|end|>, both drop the oldest turns that no longer fit, and the page keeps the
conversation. The models are bigrams in a GPT's clothes, so that each reply is known beforehand."""

import concurrent.futures
import dataclasses
import json
import os
import signal

import pytest
import torch

import conftest  # noqa: F401 (first: it puts the project on sys.path)
from test_chat import INJECTION, PRINTABLE, browser, events, get, health, open_page, post, served  # noqa: F401
from test_chat import serving, tiny_checkpoint

import chat
import web
from generate import generate, load_for_sampling
from gpt import GPT, GPTConfig
from tokenizer import CharTokenizer, ChatTokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
HI = {"role": "assistant", "content": "hi!"}  # what replying(path, "hi!") always says


def chat_tokenizer():
    return ChatTokenizer(CharTokenizer(PRINTABLE))


def bigram_checkpoint(path, table, block_size=64):
    """A train.py-style checkpoint of a chat model (chat_tokenizer()) whose next token depends on the current one
    alone, with the logits in row `token` of `table` (V, V). Its block adds nothing (output projections at zero)
    and the positions nothing (wpe at zero), so each position's final hidden state is ln_f of its token's one-hot
    embedding, a vector whose first V entries form an invertible (V, V) matrix (n_embd > V); the untied lm_head
    that maps those to the table's rows is solved for."""
    tok = chat_tokenizer()
    V = tok.vocab_size
    model = GPT(GPTConfig(block_size=block_size, vocab_size=V, n_layer=1, n_head=2, n_embd=V + 4,
                          tie_embeddings=False))
    with torch.no_grad():
        block = model.transformer.h[0]
        for p in (block.attn.c_proj.weight, block.attn.c_proj.bias, block.mlp.c_proj.weight, block.mlp.c_proj.bias,
                  model.transformer.wpe.weight):
            p.zero_()
        model.transformer.wte.weight.copy_(torch.eye(V, V + 4))
        hidden = model.transformer.ln_f(model.transformer.wte.weight)[:, :V]  # (V, V): lm_head reads no other column
        model.lm_head.weight.zero_()[:, :V] = torch.linalg.solve(hidden, table).T  # hidden @ weight.T == table
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                    tokenizer=tok.to_dict()), path)
    return str(path)


def replying(path, reply, end=True, **shape):
    """A chat model whose greedy reply is always `reply` (distinct characters), then <|end|>; with end=False it
    goes round the reply's characters forever."""
    tok = chat_tokenizer()
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    chain = [tok.special["<|assistant|>"]] + tok.encode(reply) + [tok.end if end else tok.encode(reply)[0]]
    for token, next_token in zip(chain, chain[1:]):
        table[token, next_token] = 10.0
    return bigram_checkpoint(path, table, **shape)


def random_bigram(path, end_bias=2.0, **shape):
    """A chat model with random logits, <|end|>'s raised by end_bias: sampled replies of varied length."""
    tok = chat_tokenizer()
    table = torch.randn(tok.vocab_size, tok.vocab_size, generator=torch.Generator().manual_seed(0)) * 2
    table[:, tok.end] += end_bias
    return bigram_checkpoint(path, table, **shape)


def rendered(tok, messages):
    """The prompt for the reply to `messages`."""
    return tok.render(messages, reply=True)[0]


def user(content):
    return [{"role": "user", "content": content}]


# -----------------------------------------------------------------------------
# The terminal, in this process: input() fed from a list, and the ids of every prompt the model is given


@pytest.fixture
def terminal(monkeypatch, capsys):
    """Run chat.chat() on a checkpoint with `lines` typed and the settings given; returns (what it printed, the
    prompts given to the model, as lists of ids). `stop_after`: Ctrl-C (a real SIGINT) after that many tokens."""

    def run(path, lines, stop_after=None, **settings):
        for name, value in (dict(temperature=0.0, length=10, init_from=path) | settings).items():
            monkeypatch.setattr(chat, name, value)
        typed = list(lines)
        prompts, tokens = [], chat.tokens

        def type_line(prompt=""):
            if not typed:
                raise EOFError
            print(prompt + typed[0])
            return typed.pop(0)

        def recording(model, ids, settings, generator):
            prompts.append(list(ids))
            for i, token in enumerate(tokens(model, ids, settings, generator)):
                if i == stop_after:
                    os.kill(os.getpid(), signal.SIGINT)  # CtrlC's handler runs before this token is handed over
                yield token

        monkeypatch.setattr("builtins.input", type_line)
        monkeypatch.setattr(chat, "tokens", recording)
        model, tok = load_for_sampling(path, "cpu", "float32")
        chat.chat(model, tok)
        return capsys.readouterr().out, prompts

    return run


def test_the_terminal_takes_turns_carries_the_conversation_and_stops_at_the_end_token(tmp_path, terminal):
    tok = chat_tokenizer()
    path = replying(tmp_path / "hi.pt", "hi!")
    out, prompts = terminal(path, ["hello", "", "and you?", "/system Be brief.", "again", "/reset", "once more"])
    first, second = user("hello"), user("and you?")
    assert prompts == [rendered(tok, first),  # the empty line made no turn
                       rendered(tok, first + [HI] + second),
                       rendered(tok, [SYSTEM] + first + [HI] + second + [HI] + user("again")),
                       rendered(tok, [SYSTEM] + user("once more"))]  # /reset kept the system message
    assert "a chat model: it takes turns with you" in out and "type a message and the model replies" in out
    assert out.count("> hello\nhi!\n> ") == 1 and "<|end|>" not in out  # the end token ends it, unshown
    assert "(the system message is now: Be brief.)" in out and "(the conversation is forgotten)" in out


def test_the_terminal_forgets_the_oldest_turns_that_no_longer_fit_and_says_so(tmp_path, terminal):
    tok = chat_tokenizer()
    path = replying(tmp_path / "hi.pt", "hi!", block_size=64)
    lines = ["the first line", "the second line", "the third line", "x" * 60]
    out, prompts = terminal(path, ["/system Be brief."] + lines, length=10)
    exchanges = [user(line) + [HI] for line in lines]
    # each exchange takes 1 + 14 + 1 + 1 + 3 + 1 = 21 or 22 positions, the system 11, <|assistant|> 1, the reply 10
    assert prompts == [rendered(tok, [SYSTEM] + user(lines[0])),
                       rendered(tok, [SYSTEM] + exchanges[0] + user(lines[1])),
                       rendered(tok, [SYSTEM] + exchanges[1] + user(lines[2]))]  # the first exchange went
    assert all(len(p) + 10 <= 64 for p in prompts)
    assert "(the oldest 2 messages are forgotten" in out
    assert ("error: the last message with the system message and a reply of 10 tokens need 84 positions, more "
            "than this model's block_size of 64") in out  # the long line: no prompt at all


def test_ctrl_c_stops_a_reply_whose_shown_part_stays_in_the_conversation(tmp_path, terminal):
    tok = chat_tokenizer()
    path = replying(tmp_path / "ab.pt", "ab", end=False)  # abab... until the length, or Ctrl-C
    out, prompts = terminal(path, ["go", "on"], stop_after=3, length=20)
    assert "> go\naba [stopped]\n> on\n" in out
    kept = user("go") + [{"role": "assistant", "content": "aba"}] + user("on")
    assert prompts[1] == rendered(tok, kept)


def test_a_base_model_has_no_system_message_and_its_help_is_as_before(tmp_path, terminal):
    out, prompts = terminal(tiny_checkpoint(tmp_path / "tiny.pt"), ["/system Be brief.", "/help"])
    assert "error: /system is for a chat model, which takes turns; this one continues text" in out
    assert chat.HELP in out and "/system" not in chat.HELP and chat.TURNS_HELP not in out and not prompts


# -----------------------------------------------------------------------------
# The API


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """chat.py --web serving a random chat model of block_size 64."""
    path = random_bigram(tmp_path_factory.mktemp("chatty") / "chatty.pt")
    with serving(path, "--max_length=64", "--max_prompt=300", "--length=20", "--max_streams=8") as server:
        yield server


def cut_at_end(model, tok, ids, length, seed, temperature=0.8):
    """generate.py's tokens for the prompt ids and seed, up to the first <|end|>, and why they stopped."""
    generator = torch.Generator().manual_seed(seed)
    made = [t.item() for t in generate(model, torch.tensor([ids]), length, temperature, 0, 1.0, generator)]
    return (made[: made.index(tok.end)], "end") if tok.end in made else (made, "length")


def test_a_chat_reply_is_generate_pys_tokens_for_the_rendered_prompt_cut_at_the_end_token(chatty):
    model, tok = chatty["model"], chatty["tok"]
    long = [{"role": "user", "content": "a question"}, {"role": "assistant", "content": "an answer"}]
    asks = [([{"role": "user", "content": "Hi"}], 1), ([SYSTEM, {"role": "user", "content": "Hi"}], 2),
            ([SYSTEM, *long, *long, {"role": "user", "content": "and?"}], 3)] + \
           [([{"role": "user", "content": f"client {i}"}], 10 + i) for i in range(5)]

    def ask(messages, seed):
        return events(post(chatty["port"], {"messages": messages, "seed": seed, "length": 20}))

    before = health(chatty["port"])["tokens"]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:  # side by side: rows end at different steps
        answers = list(pool.map(lambda a: ask(*a), asks))
    stops = []
    for (messages, seed), got in zip(asks, answers):
        ids, dropped = chat.conversation_prompt(tok, messages, 20, 64)
        assert got[0] == {"seed": seed, "prompt_tokens": len(ids), "dropped": dropped}
        expected, stop = cut_at_end(model, tok, ids, 20, seed)
        assert [e["token"] for e in got[1:-1]] == expected and tok.end not in expected
        assert got[-1]["done"] and got[-1]["tokens"] == len(expected) and got[-1]["stop"] == stop
        assert "".join(e["text"] for e in got[1:-1]) == tok.decode(expected)
        stops.append(stop)
    assert got[0]["dropped"] == 0 and answers[2][0]["dropped"] == 2  # the long one lost its oldest exchange
    assert answers[2][0]["prompt_tokens"] == len(rendered(tok, [SYSTEM, *long, {"role": "user", "content": "and?"}]))
    assert {"end", "length"} <= set(stops)
    assert health(chatty["port"])["tokens"] - before == sum(a[-1]["tokens"] for a in answers)  # no <|end|> counted


@pytest.mark.parametrize("body, complaint", [
    ({"prompt": "Hi"}, 'this is a chat model: send "messages"'),
    ({"prompt": "Hi", "messages": user("Hi")}, 'this is a chat model: send "messages"'),
    ({}, 'give the conversation as "messages", a list'),
    ({"messages": "Hi"}, 'give the conversation as "messages", a list'),
    ({"messages": []}, 'give the conversation as "messages", a list'),
    ({"messages": [["user", "Hi"]]}, 'message 0 must be an object with a "role" and a "content"'),
    ({"messages": [{"role": "user"}]}, 'message 0 must be an object with a "role" and a "content"'),
    ({"messages": [{"role": "user", "content": "Hi", "name": "x"}]}, "and nothing else"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, 'message 0 has the role "robot"; the roles are system'),
    ({"messages": [{"role": ["user"], "content": "Hi"}]}, 'message 0 has the role ["user"]'),
    ({"messages": user("a") + [SYSTEM] + user("b")}, 'message 1 has the role "system"; the roles are'),
    ({"messages": [{"role": "user", "content": 7}]}, "message 0's content must be a string, got 7"),
    ({"messages": [{"role": "user", "content": None}]}, "message 0's content must be a string, got null"),
    ({"messages": user("Hi") + [{"role": "assistant", "content": "Yo"}]}, "the last message must be the user's"),
    ({"messages": [SYSTEM]}, "the last message must be the user's"),
    ({"messages": user("a" * 150) + [{"role": "assistant", "content": "b"}] + user("c" * 150)}, "at most 300"),
    ({"messages": user("café")}, "outside this model's vocabulary: 'é'"),
    ({"messages": [{"role": "system", "content": "é"}] + user("Hi")}, "outside this model's vocabulary"),
    ({"messages": user("a" * 50)}, "a reply of 20 tokens need 73 positions, more than this model's block_size of 64"),
    ({"messages": user("a" * 40), "length": 61}, "a reply of 32 tokens need 75 positions"),  # room: half the block
    ({"messages": user("Hi"), "temperature": -1}, "temperature=-1 is out of range"),
    ({"messages": user("Hi"), "turns": 1}, "unknown field 'turns'; the fields are messages, temperature"),
])
def test_bad_messages_get_400_and_one_line_of_json(chatty, body, complaint):
    response = post(chatty["port"], body)
    assert response.status == 400 and response.getheader("Content-Type") == "application/json"
    reply = response.read().decode()
    assert reply.count("\n") == 1 and complaint in json.loads(reply)["error"], reply
    assert health(chatty["port"])["status"] == "ok"


def test_the_model_report_says_which_models_take_turns_and_a_base_model_takes_no_messages(chatty, served):
    assert json.loads(get(chatty["port"], "/api/model")[2])["chat"] is True
    assert json.loads(get(served["port"], "/api/model")[2])["chat"] is False
    response = post(served["port"], {"messages": user("Hi")})
    assert response.status == 400
    assert 'takes no "messages" (a chat model does): send the text as "prompt"' in json.loads(response.read())["error"]
    got = events(post(served["port"], {"prompt": "Hi", "length": 3, "seed": 1}))  # and a prompt as before
    assert got[0] == {"seed": 1, "prompt_tokens": 2} and set(got[-1]) == {"done", "tokens", "seconds", "tokens_per_s"}


# -----------------------------------------------------------------------------
# The page, in a real browser


def test_the_page_takes_turns_sends_the_conversation_and_shows_each_reply_as_text(tmp_path, browser, monkeypatch):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    prompts, stream = [], web.Handler.stream

    def recording(handler, ids, settings, dropped=None):
        if handler.server.server_port == server["port"]:  # not a request still running on another test's server
            prompts.append(ids)
        return stream(handler, ids, settings, dropped)

    monkeypatch.setattr(web.Handler, "stream", recording)
    with serving(replying(tmp_path / "hi.pt", "hi!", block_size=128), "--max_length=64") as server:
        tok = server["tok"]
        element = open_page(browser, f"http://127.0.0.1:{server['port']}/", "", 10)
        assert "a chat model" in element("model").text and element("generate").text == "Send"
        assert not element("continue").is_displayed() and element("system").is_displayed()
        turns = lambda: [(t.find_element(By.TAG_NAME, "b").text, t.find_element(By.TAG_NAME, "span").text)
                         for t in browser.find_elements(By.CSS_SELECTOR, "#output .turn")]
        element("temperature").clear()
        element("temperature").send_keys("0")
        element("system").send_keys("Be brief.")
        element("prompt").send_keys(INJECTION)
        replied = lambda n: lambda _: len(turns()) == 2 * n and "tokens/s (seed" in element("status").text
        element("generate").click()
        WebDriverWait(browser, 30).until(replied(1))
        element("prompt").send_keys("and you?" + Keys.ENTER)  # Enter sends
        WebDriverWait(browser, 30).until(replied(2))
        assert turns() == [("you", INJECTION), ("model", "hi!"), ("you", "and you?"), ("model", "hi!")]
        first, second = user(INJECTION), user("and you?")
        assert prompts == [rendered(tok, [SYSTEM] + first), rendered(tok, [SYSTEM] + first + [HI] + second)]
        assert browser.find_elements(By.TAG_NAME, "img") == [] and element("prompt").get_attribute("value") == ""
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text
        element("prompt").send_keys("x" * 60 + Keys.ENTER)  # too long for all of it: the first exchange goes
        WebDriverWait(browser, 30).until(replied(3))
        assert prompts[2] == rendered(tok, [SYSTEM] + second + [HI] + user("x" * 60))
        classes = [t.get_attribute("class") for t in browser.find_elements(By.CSS_SELECTOR, "#output .turn")]
        assert classes == ["turn user forgotten", "turn assistant forgotten"] + ["turn user", "turn assistant"] * 2
        element("prompt").send_keys("y" + Keys.ENTER)  # the page keeps only what the server kept
        WebDriverWait(browser, 30).until(replied(4))
        assert prompts[3] == rendered(tok, [SYSTEM] + second + [HI] + user("x" * 60) + [HI] + user("y"))
        assert browser.execute_script("return conversation.length") == 6
        element("reset").click()
        assert turns() == []
        element("system").clear()
        element("prompt").send_keys("again")
        element("generate").click()
        WebDriverWait(browser, 30).until(replied(1))
        assert turns() == [("you", "again"), ("model", "hi!")] and prompts[4] == rendered(tok, user("again"))
