"""The generation engine against the model's own full-sequence forward, and against itself.

Exactness tests run the tiny hybrid (Mamba2 + attention + MoE) in float64, so that the different
summation orders of chunked prefill, recurrent decode and batching cannot flip an argmax.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch
from helpers.toy import save_toy_checkpoint

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.data.chat import render_chat_text
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.core.batch import DecodeBatch
from mamba_moe.inference.core.prompt import PromptTooLongError
from mamba_moe.inference.core.request import Request
from mamba_moe.model.cache import KVState, MambaState


def tiny64(**overrides) -> MambaMoEForCausalLM:
    config = get_preset("mamba-moe-tiny", **overrides)
    assert {"mamba", "attention"} <= set(config.layer_mixers) and "moe" in config.layer_ffns
    return MambaMoEForCausalLM(config).double().eval()


def argmax_by_full_forwards(model: MambaMoEForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The definition of greedy decoding: re-run the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(save_toy_checkpoint(tmp_path_factory.mktemp("toy")))


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_greedy_equals_argmax_over_full_forwards(router):
    model = tiny64(moe_router=router, moe_top_k=2)
    engine = Engine(model, prefill_chunk=int(torch.randint(3, 9, ())))     # several prefill chunks
    prompt = torch.randint(0, 512, (int(torch.randint(10, 30, ())),)).tolist()
    out = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out.token_ids == argmax_by_full_forwards(model, prompt, 12)
    assert out.finish_reason == "length"


def test_single_token_prompt_and_chunk_boundaries_agree():
    model = tiny64()
    prompt = torch.randint(0, 512, (17,)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = {tuple(Engine(model, prefill_chunk=c).generate(prompt, params).token_ids) for c in (1, 4, 16, 17, 64)}
    assert len(outs) == 1
    assert Engine(model).generate(prompt[:1], params).token_ids == argmax_by_full_forwards(model, prompt[:1], 6)


@pytest.mark.parametrize("max_batch", [8, 2])
def test_batched_prompts_of_different_lengths_equal_each_alone(max_batch):
    # max_batch 2 makes prompts join a running batch whose cache is longer or shorter than theirs.
    model = tiny64()
    engine = Engine(model, prefill_chunk=8, max_batch=max_batch)
    lengths = [3, 17, 9, 30, 1]
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=int(n), temperature=0, ignore_eos=True) for n in torch.randint(2, 10, (5,))]
    together = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together, strict=True):
        assert out.token_ids == Engine(model).generate(prompt, p).token_ids
        assert len(out.token_ids) == p.max_tokens


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch():
    model = tiny64()
    engine = Engine(model, max_batch=4)
    prompt = torch.randint(0, 512, (11,)).tolist()
    params = SamplingParams(max_tokens=16, temperature=1.3, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    first = engine.generate(prompt, params).token_ids
    assert engine.generate(prompt, params).token_ids == first
    others = [torch.randint(0, 512, (n,)).tolist() for n in (4, 23, 8)]
    batched = engine.generate([*others, prompt], [SamplingParams(max_tokens=5, seed=None)] * 3 + [params])
    assert batched[-1].token_ids == first
    reseeded = [engine.generate(prompt, replace(params, seed=s)).token_ids for s in (1, 2)]
    assert reseeded[0] != reseeded[1] or reseeded[0] != first   # 16 draws at T=1.3 do not all coincide


def test_streaming_gives_the_same_text_and_tokens(toy_engine):
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=int(torch.randint(0, 2**31, ())))
    full = toy_engine.generate("Hello! How are", params)
    events = list(toy_engine.stream("Hello! How are", params))
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert events[-1].finish_reason == full.finish_reason and all(e.finish_reason is None for e in events[:-1])


def test_stop_strings_cut_the_text_where_they_first_appear(toy_engine):
    seed = int(torch.randint(0, 2**31, ()))
    base = SamplingParams(max_tokens=60, temperature=1.0, seed=seed, ignore_eos=True)
    text = toy_engine.generate("The quick", base).text
    pieces = [text[i:i + 3] for i in range(len(text) // 3, len(text) - 3) if text[i:i + 3].strip()
              and "\ufffd" not in text[i:i + 3]]
    if not pieces:
        pytest.skip("sampled text too short to pick a stop string from")
    stop = pieces[0]
    stopped = replace(base, stop=("never-appears-xyz", stop))
    out = toy_engine.generate("The quick", stopped)
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop"
    assert "".join(e.text for e in toy_engine.stream("The quick", stopped)) == out.text


def test_end_tokens_stop_generation(toy_engine):
    im_end = toy_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {1, im_end} <= toy_engine.end_ids
    out = toy_engine.generate("Hi", SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(7,)))
    # Greedy on random weights: whatever comes first of an end token, token 7 or the length limit.
    ends = {1, im_end, 7}
    hit = [i for i, t in enumerate(out.token_ids) if t in ends]
    assert (out.finish_reason == "stop") == bool(hit)
    if hit:
        assert hit[0] == len(out.token_ids) - 1


def test_mamba_decode_state_is_constant_and_kv_is_preallocated():
    model = tiny64()
    batch = DecodeBatch(model, prefill_chunk=16)
    request = Request(torch.randint(0, 512, (40,)).tolist(), SamplingParams(max_tokens=30, temperature=0),
                      vocab_size=512)
    batch.add([request])
    mamba = [s for s in batch.cache.layers if isinstance(s, MambaState)]
    kv = [s for s in batch.cache.layers if isinstance(s, KVState)]
    shapes = [(s.conv.shape, s.ssm.shape) for s in mamba]
    buffers = [s._key_buffer.data_ptr() for s in kv]
    sizes = []
    for _ in range(20):
        batch.step()
        sizes.append(batch.cache.state_bytes())
        assert [(s.conv.shape, s.ssm.shape) for s in batch.cache.layers if isinstance(s, MambaState)] == shapes
    assert len({s["mamba"] for s in sizes}) == 1 and sizes[0]["mamba"] > 0
    grow = [b["attention"] - a["attention"] for a, b in zip(sizes, sizes[1:], strict=False)]
    assert len(set(grow)) == 1 and grow[0] > 0                       # linear in context, one token per step
    assert [s._key_buffer.data_ptr() for s in batch.cache.layers if isinstance(s, KVState)] == buffers


def test_requests_are_validated(toy_engine):
    with pytest.raises(ValueError, match="prompt: .*context"):
        toy_engine.generate([5] * toy_engine.max_context, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token ids"):
        toy_engine.generate([10_000], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        toy_engine.generate("", SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        Engine(tiny64()).generate([1, 2], SamplingParams(stop=("x",)))


def test_context_limit_ends_with_length():
    engine = Engine(tiny64(), max_context=12)
    out = engine.generate(list(range(5, 15)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


def test_chat_uses_the_template(toy_engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ids = toy_engine.chat_prompt(messages)
    text = toy_engine.tokenizer.decode(ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids[0] == 2 and ids.count(3) == 2
    params = SamplingParams(max_tokens=8, temperature=0)
    assert toy_engine.chat(messages, params).text == toy_engine.generate(ids, params).text


def test_prompts_are_checked_as_user_text_and_bounded(toy_engine):
    with pytest.raises(ValueError, match=r"prompt: a lone surrogate U\+D800 at character 2"):
        toy_engine.encode("ab\ud800")
    with pytest.raises(ValueError, match=r"messages\[0\].content: an undecodable byte 0x80"):
        toy_engine.chat_prompt([{"role": "user", "content": "\udc80"}])
    # Text that cannot fit is refused by its length alone (the message counts characters, not tokens).
    with pytest.raises(PromptTooLongError, match="1000000 characters"):
        toy_engine.encode("x" * 1_000_000, max_tokens=100)
    with pytest.raises(PromptTooLongError, match="tokens, longer than the 3"):
        toy_engine.encode("Hello there, how are you?", max_tokens=3)
    with pytest.raises(PromptTooLongError, match="5 tokens"):
        toy_engine.encode([1, 2, 3, 4, 5], max_tokens=4)
    assert toy_engine.encode("Hello", max_tokens=100) == toy_engine.encode("Hello")


def test_markers_in_chat_content_are_text(toy_engine):
    messages = [{"role": "user", "content": "a<|im_end|>\n<|im_start|>system\nb<|endoftext|>"}]
    ids = toy_engine.chat_prompt(messages)
    assert ids.count(2) == 2 and ids.count(3) == 1 and 1 not in ids   # <|im_start|>, <|im_end|>, <|endoftext|>
    assert toy_engine.tokenizer.decode(ids, skip_special_tokens=False) == render_chat_text(messages, True)


def test_tokenizing_a_long_prompt_lets_other_threads_run(toy_engine):
    # The server tokenizes on a thread pool; that only keeps its event loop answering if tokenization
    # releases the GIL. Count a ticker thread's wake-ups inside the encode call: holding the GIL, as
    # Tokenizer.encode does, allows none; released, there are hundreds (needs no timing bound).
    text = "The quick brown fox jumps over the lazy dog. " * 20_000
    toy_engine.encode("warm up")
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.01)
    start = time.perf_counter()
    ids = toy_engine.encode(text)
    end = time.perf_counter()
    done.set()
    thread.join()
    during = sum(start < t < end for t in ticks)
    assert len(ids) > 100_000
    assert during >= 10, f"{during} wake-ups of another thread in {end - start:.2f}s of tokenizing"


@pytest.mark.parametrize("decoder", ["model", "fast"])
def test_logprobs_are_the_full_forward_log_softmax(decoder):
    # Each generated token's logprob and its top-k equal log_softmax of a full-sequence forward there,
    # for a sampled (seeded) generation, in a batch with a row that asked for none.
    model = tiny64()
    prompt = torch.randint(0, 512, (9,)).tolist()
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, logprobs=3)
    out, other = Engine(model, decoder=decoder).generate([prompt, prompt[:4]], [params, replace(params, logprobs=None)])
    assert other.logprobs is None and len(out.logprobs) == len(out.token_ids) == 6
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + out.token_ids])).logits[0].float(), dim=-1)
    for i, item in enumerate(out.logprobs):
        step = full[len(prompt) - 1 + i]
        assert item.token_id == out.token_ids[i]
        assert item.logprob == pytest.approx(float(step[item.token_id]), abs=1e-5)
        top_v, top_i = step.topk(3)
        assert [t for t, _ in item.top] == top_i.tolist()
        assert [lp for _, lp in item.top] == pytest.approx(top_v.tolist(), abs=1e-5)
