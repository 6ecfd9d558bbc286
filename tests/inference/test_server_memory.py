"""``mamba-moe serve --memory DB``: a real server process driven by the official ``openai`` client with ``user=``.

Greedy float64 answers are compared with the engine run here over the prompt the memory should have built
(the same store, read through a second connection), so the test sees exactly which memory reached which
user's prompt: one user's facts never reach another's, a request without ``user`` gets none.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import serving
from helpers.toy import save_toy_checkpoint

from mamba_moe.cli import main
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.memory import MemoryStore
from mamba_moe.memory.session import MemoryOptions, memory_block, system_tokens

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "toy"
GREEDY = SamplingParams(max_tokens=5, temperature=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy"), max_position_embeddings=2048, seed=serving.TOY_SEED)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint, dtype=torch.float64)


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
        return json.loads(response.read())


def settle(url: str) -> None:
    """Wait until the server's memory writes have run (they are queued before the response is sent)."""
    for _ in range(600):
        if health(url)["memory"]["pending_writes"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"memory writes still pending: {health(url)}")


def ask(client, text: str, user: str | None = None, **extra):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=GREEDY.max_tokens, temperature=0,
        **({"user": user} if user is not None else {}), **extra)
    return raw.headers.get("x-mamba-moe-memory"), raw.parse().choices[0].message.content


def expected(engine: Engine, db, user: str, text: str) -> tuple[str, str]:
    """The block the server should inject for ``user`` and the greedy reply to the prompt holding it."""
    options = MemoryOptions()
    with MemoryStore(db) as store:
        block, _ = memory_block(store.search(user, text, k=options.k_facts),
                                store.search_documents(user, text, k=options.k_documents),
                                system_tokens(engine), options.budget.max_block_tokens)
    messages = ([{"role": "system", "content": block}] if block else []) + [{"role": "user", "content": text}]
    return block, engine.chat(messages, GREEDY).text


@pytest.mark.slow   # a server process and a dozen requests: about 13 s on the 2-core machine
def test_users_get_their_own_memory_and_nobody_elses(checkpoint, engine, tmp_path):
    db = tmp_path / "memory.db"
    with serving.running_server(checkpoint, "--memory", str(db), model_name=MODEL) as (url, client):
        assert ask(client, "Hi, I'm Ada. I live in Paris.", "ada")[0].startswith("on")
        assert ask(client, "My name is Bob. I live in Lima.", "bob")[0].startswith("on")
        cities = {f"user{i}": city for i, city in enumerate(["Oslo", "Rome", "Kyiv", "Bern"])}
        with ThreadPoolExecutor(4) as pool:                      # users at once: one writer, no mix-ups
            list(pool.map(lambda u: ask(client, f"I live in {cities[u]}.", u), cities))
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content":
                                                "My favourite colour is green."}], user="ada", max_tokens=3,
                                                stream=True)
        assert [c for c in stream]                            # written once the stream has finished
        settle(url)
        with MemoryStore(db) as store:
            assert store.current("ada", "city").value == "Paris" and store.current("bob", "city").value == "Lima"
            assert store.current("ada", "favourite_colour").value == "green"
            assert store.current("bob", "favourite_colour") is None
            assert {u: store.current(u, "city").value for u in cities} == cities

        question = "What is my name and where do I live?"
        for user, mine, theirs in (("ada", "Paris", "Lima"), ("bob", "Lima", "Paris")):
            block, reply = expected(engine, db, user, question)
            assert mine in block and theirs not in block
            header, content = ask(client, question, user)
            assert header.startswith("on; facts=") and int(header.split("facts=")[1].split(";")[0]) >= 2
            assert content == reply
        header, content = ask(client, question)                  # no user: no memory at all
        assert header == "off" and content == engine.chat([{"role": "user", "content": question}], GREEDY).text

        with pytest.raises(openai.BadRequestError, match="temperature"):   # refused: it must change nothing
            ask(client, "Please forget where I live.", "ada", extra_body={"temperature": -1})
        with MemoryStore(db) as store:
            assert store.current("ada", "city").value == "Paris"
        assert ask(client, "Please forget where I live.", "ada")[0].startswith("on")   # applied before the reply
        with MemoryStore(db) as store:
            assert store.history("ada", "city") == [] and store.current("bob", "city").value == "Lima"
        block, reply = expected(engine, db, "ada", "Where do I live?")
        assert "Paris" not in block and ask(client, "Where do I live?", "ada")[1] == reply
        with pytest.raises(openai.BadRequestError, match="user: 300 characters"):
            ask(client, "Hello", "x" * 300)                          # a name the store refuses: the client's error
        settle(url)
        assert health(url)["memory"]["write_failures"] == 0 and health(url)["memory"]["degraded"] == 0


def test_a_bad_memory_db_stops_the_server_before_it_starts(checkpoint, tmp_path, capsys):
    foreign = tmp_path / "notes.db"
    foreign.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 100)
    assert main(["serve", str(checkpoint), "--port", "0", "--memory", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "Traceback" not in err


class BrokenStore:
    """A store whose every call fails (a DB that went away under the server)."""

    path = "broken.db"

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise OSError("disk I/O error")
        return fail


def test_a_failing_memory_degrades_the_reply_instead_of_failing_it(engine):
    from mamba_moe.inference.serving.memory import ServerMemory
    from mamba_moe.inference.serving.server import create_app

    app = create_app(engine, MODEL, memory=ServerMemory(BrokenStore(), engine))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
    try:
        for _ in range(300):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.05)
        header, content = ask(client, "My name is Ada.", "ada")
        assert header == "degraded" and content == engine.chat([{"role": "user", "content": "My name is Ada."}],
                                                               GREEDY).text
        assert health(url)["memory"]["degraded"] == 1
        with pytest.raises(openai.BadRequestError, match="user"):
            ask(client, "Hello", {"not": "a name"})
    finally:
        server.should_exit = True
        thread.join(30)
