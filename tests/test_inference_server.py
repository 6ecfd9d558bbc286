"""``mamba-moe serve`` as a real process on a free localhost port, driven by the official ``openai`` client.

The server runs the toy checkpoint in float64, so its greedy answers can be compared token for token
with the engine run in this process.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.toy import save_toy_checkpoint

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "toy"
MAX_TOKENS_LIMIT = 4000


# The toy weights' seed: MAMBA_MOE_TEST_SEED replays a run (every failure message names it).
TOY_SEED = int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A long context, so one request can outlast many short ones by far.
    print(f"toy checkpoint seed: {TOY_SEED} (replay with MAMBA_MOE_TEST_SEED={TOY_SEED})")
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy"), max_position_embeddings=4096, seed=TOY_SEED)


@pytest.fixture(scope="module")
def engine(checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.from_pretrained(checkpoint, dtype=torch.float64)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(checkpoint):
    """Start the server on port 0 (the OS picks a free one) and read the port from its first line."""
    cmd = [sys.executable, "-m", "mamba_moe", "serve", str(checkpoint), "--port", "0", "--threads", "1",
           "--dtype", "float64", "--model-name", MODEL, "--max-batch", "3", "--max-prompt-tokens", "120",
           "--max-tokens-limit", str(MAX_TOKENS_LIMIT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, f"server did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        url = f"http://127.0.0.1:{match.group(1)}/v1"
        threading.Thread(target=proc.stdout.read, daemon=True).start()   # keep draining its log
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)
        for _ in range(300):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def health(client) -> dict:
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(root + "/health", timeout=30) as response:
        return json.loads(response.read())


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_models_and_health(server):
    assert [m.id for m in server.models.list().data] == [MODEL]
    assert health(server)["status"] == "ok"


def test_chat_completion_matches_the_engine(server, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"}]
    reply = server.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                           n=1, logprobs=False, frequency_penalty=0, user="tester")  # neutral
    expected = engine.chat(messages, greedy(10))
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_streaming_chat_and_completion_equal_non_streaming(server):
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    seed = int(torch.randint(0, 2**31, ()))
    args = dict(model=MODEL, messages=messages, max_tokens=24, temperature=1.0, seed=seed)
    whole = server.chat.completions.create(**args).choices[0].message.content
    chunks = list(server.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    plain = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=seed)
    whole = server.completions.create(**plain).choices[0].text
    assert "".join(c.choices[0].text for c in server.completions.create(**plain, stream=True)) == whole


def test_stop_strings_and_completion_prompt_as_token_ids(server, engine):
    ids = engine.encode("The quick brown")
    text = server.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert text == engine.generate(ids, greedy(30, ignore_eos=True)).text
    visible = [text[i:i + 2] for i in range(1, len(text) - 2)
               if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2]]
    if visible:
        stopped = server.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0, stop=[visible[0]],
                                            extra_body={"ignore_eos": True})
        assert stopped.choices[0].text == text[:text.index(visible[0])]
        assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs,field", [
    (dict(messages=openai.omit), "messages"),                                   # missing field
    (dict(messages="hello"), "messages"),                                        # wrong type
    (dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
    (dict(max_tokens="ten"), "max_tokens"),
    (dict(temperature="hot"), "temperature"),
    (dict(max_tokens=MAX_TOKENS_LIMIT + 1), "max_tokens"),                      # over the server's limit
    (dict(messages=[{"role": "user", "content": "many words " * 200}]), "longer than"),  # too-long prompt
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(n=9), "n"),                                                           # above the server's 8
    (dict(top_logprobs=2), "top_logprobs"),                                     # without logprobs: true
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
])
def test_bad_requests_get_400_with_a_message(server, kwargs, field):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        server.chat.completions.create(**args)
    assert info.value.status_code == 400
    assert field in info.value.message


def test_logprobs_match_the_engine(server, engine):
    messages = [{"role": "user", "content": "Hello! How are you?"}]
    reply = server.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    expected = engine.chat(messages, greedy(5, ignore_eos=True, logprobs=3))
    content = reply.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 5
    for got, want in zip(content, expected.logprobs, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-6)
        assert got.token == engine.tokenizer.decode([want.token_id], skip_special_tokens=False)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in want.top], abs=1e-6)
        assert got.top_logprobs[0].logprob == pytest.approx(got.logprob)       # greedy picks the top token
    plain = server.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True}).choices[0]
    assert len(plain.logprobs.tokens) == len(plain.logprobs.token_logprobs) == 4
    assert all(1 <= len(top) <= 2 for top in plain.logprobs.top_logprobs)
    assert plain.logprobs.text_offset[0] == 0 and plain.logprobs.text_offset == sorted(plain.logprobs.text_offset)
    # streamed: the same logprobs, chunk by chunk
    chunks = list(server.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_n_choices_are_the_seeded_single_requests(server):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})
    many = server.completions.create(**args, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [server.completions.create(**{**args, "seed": 7 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == singles
    assert many.usage.completion_tokens == 24
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = dict(model=MODEL, messages=messages, max_tokens=6, temperature=1.0, seed=11, n=2)
    whole = server.chat.completions.create(**chat)
    chunks = list(server.chat.completions.create(**chat, stream=True))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == whole.choices[i].message.content
    reasons = {c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert reasons <= {"stop", "length"} and len(reasons) >= 1


def test_bad_completion_requests(server):
    with pytest.raises(openai.BadRequestError, match="prompt"):
        server.completions.create(model=MODEL, prompt=openai.omit, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        server.completions.create(model=MODEL, prompt=[10**6], max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.completions.create(model="gpt-4", prompt="hi", max_tokens=4)


def test_concurrent_clients_are_all_answered_and_none_waits_for_a_long_one(server, engine):
    # One long streaming request holds a slot; eight short ones (more than the batch of 3) arrive while
    # it runs and must all be answered, correctly, while it is still running.
    long = server.completions.create(model=MODEL, prompt="A long story:", max_tokens=MAX_TOKENS_LIMIT, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})
    # Wait for it to run rather than for its first text: greedy random weights may emit tokens without text
    # (special tokens) for a while. (The #6 bug: stray UTF-8 bytes used to hold back all text to the end.)
    wait_for_running(server, 1)
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(8)]

    def ask(prompt: str) -> str:
        return server.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    start = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert time.monotonic() - start < 60, "the short requests waited for the long one"
    wait_for_running(server, 1)  # the long one is still going
    long.close()
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == engine.generate(prompt, greedy(6, ignore_eos=True)).text
    wait_until_idle(server)


def wait_for_running(client, count: int) -> None:
    """Poll /health until ``count`` requests run: the worker's batch is briefly empty between steps."""
    for _ in range(200):
        if health(client)["running"] == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected {count} running request(s): {health(client)} (toy seed {TOY_SEED})")


def wait_until_idle(client) -> None:
    wait_for_running(client, 0)


def test_a_client_that_disconnects_frees_its_slot(server):
    stream = server.completions.create(model=MODEL, prompt="Hello", max_tokens=MAX_TOKENS_LIMIT, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    wait_for_running(server, 1)  # the 4000-token stream runs for many seconds
    stream.close()
    wait_until_idle(server)
    assert server.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices[0].text is not None
