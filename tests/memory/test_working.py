"""Working memory: a chat continued on its kept state equals a fresh forward over its whole transcript.

The toy checkpoint runs in float64, so the different summation orders of one long prefill and of many
short ones cannot flip an argmax; logits are compared with atol 1e-9.
"""

from __future__ import annotations

import pytest
import torch
from helpers import serving
from helpers.toy import save_toy_checkpoint

from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.core.batch import DecodeBatch
from mamba_moe.memory.working import WorkingMemory

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=5, temperature=0)
USER_TEXTS = ["Hello! How are you today?", "My name is Ada and I live in Paris.", "What would you like to talk about?",
              "Numbers: 0 1 2 3 42.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    seed = serving.TOY_SEED      # module-scoped, so seeded here: MAMBA_MOE_TEST_SEED replays it
    print(f"toy checkpoint seed: {seed} (replay with MAMBA_MOE_TEST_SEED={seed})")
    path = save_toy_checkpoint(tmp_path_factory.mktemp("toy"), max_position_embeddings=512, seed=seed)
    return Engine.from_pretrained(path, dtype=torch.float64, prefill_chunk=48)


def fresh_reply(engine: Engine, wm: WorkingMemory, user: str, context: str | None = None) -> list[int]:
    """The reference: the whole transcript so far plus the new turn, generated from an empty state."""
    messages = ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": user}]
    prompt = wm.transcript_ids() + wm._encode(messages, True)
    return engine.generate(prompt, GREEDY).token_ids


def next_logits_agree(engine: Engine, wm: WorkingMemory) -> None:
    """The kept state's next-token logits equal a fresh forward over the transcript it has seen."""
    seen = wm.transcript_ids()[:wm.seen_tokens + 1]        # + the first id of the last reply's closing
    with torch.inference_mode():
        kept = engine.model.decode(torch.tensor([[seen[-1]]]), wm.state())[0]
        full = engine.model(torch.tensor([seen])).logits[0, -1]
    assert torch.isfinite(kept).all()
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-9)


def chat(engine: Engine, wm: WorkingMemory, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        context = "Known facts: the user likes tea." if i == 1 else None
        expected = fresh_reply(engine, wm, text, context)
        assert wm.reply(text, GREEDY, context=context).token_ids == expected


def test_turns_on_the_kept_state_equal_fresh_forwards(engine):
    wm = WorkingMemory(engine, system="You are concise.")
    chat(engine, wm, USER_TEXTS[:3])                      # each turn checked against a fresh run
    assert wm.snapshots == [1, 2, 3]
    next_logits_agree(engine, wm)
    roles = [m["role"] for m in wm.messages()]
    assert roles == ["system", "user", "assistant", "system", "user", "assistant", "user", "assistant"]
    # the kept state saw only each turn's new tokens: the transcript is the system prompt, then the turns
    assert wm.transcript_ids()[:len(wm.header)] == list(wm.header)


def test_rollback_equals_the_transcript_without_the_dropped_turns(engine):
    wm = WorkingMemory(engine)
    chat(engine, wm, USER_TEXTS[:3])
    before = wm.transcript_ids(2)
    wm.rollback(1)
    assert wm.transcript_ids() == before and len(wm.turns) == 2
    next_logits_agree(engine, wm)
    expected = fresh_reply(engine, wm, USER_TEXTS[4])
    assert wm.reply(USER_TEXTS[4], GREEDY).token_ids == expected
    wm.rollback(3)
    assert wm.turns == [] and wm.state() is None
    assert wm.reply(USER_TEXTS[0], GREEDY).token_ids == engine.generate(wm._encode(
        [{"role": "user", "content": USER_TEXTS[0]}], True), GREEDY).token_ids


def test_states_no_longer_held_are_rebuilt_from_the_tokens(engine):
    wm = WorkingMemory(engine, system="Be brief.", max_snapshots=1)
    chat(engine, wm, USER_TEXTS[:3])
    assert wm.snapshots == [3]
    wm.rollback(2)                                        # turn 1's state is gone: rebuilt by feeding its tokens
    next_logits_agree(engine, wm)
    assert wm.snapshots == [1]
    assert wm.reply(USER_TEXTS[3], GREEDY).token_ids == fresh_reply(engine, wm, USER_TEXTS[3])


def test_branches_are_independent(engine):
    wm = WorkingMemory(engine)
    chat(engine, wm, USER_TEXTS[:1])
    other = wm.branch()
    chat(engine, other, [USER_TEXTS[3]])
    assert len(wm.turns) == 1 and len(other.turns) == 2
    next_logits_agree(engine, wm)                        # the original's state is untouched by the branch
    chat(engine, wm, [USER_TEXTS[4]])
    next_logits_agree(engine, other)
    assert wm.transcript_ids(1) == other.transcript_ids(1)


def test_replace_drops_every_state(engine):
    wm = WorkingMemory(engine)
    chat(engine, wm, USER_TEXTS[:3])
    kept = [wm.turns[0], wm.turns[2]]                     # a turn dropped (e.g. it mentioned deleted text)
    wm.replace(kept, system="Summary: the user said hello.")
    assert wm.snapshots == []
    next_logits_agree(engine, wm)
    assert wm.reply(USER_TEXTS[3], GREEDY).token_ids == fresh_reply(engine, wm, USER_TEXTS[3])


def test_an_interrupted_turn_leaves_the_chat_as_it_was(engine, monkeypatch):
    wm = WorkingMemory(engine)
    chat(engine, wm, USER_TEXTS[:1])
    transcript = wm.transcript_ids()

    def interrupt(self):  # Ctrl-C during the first decode step, after the turn's tokens were prefilled
        raise KeyboardInterrupt

    monkeypatch.setattr(DecodeBatch, "step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        wm.reply(USER_TEXTS[1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    monkeypatch.undo()
    assert wm.transcript_ids() == transcript and len(wm.turns) == 1
    next_logits_agree(engine, wm)


def test_bad_arguments_are_refused(engine):
    with pytest.raises(ValueError, match="max_snapshots"):
        WorkingMemory(engine, max_snapshots=0)
    wm = WorkingMemory(engine)
    with pytest.raises(ValueError, match="n_turns"):
        wm.rollback(1)
    with pytest.raises(ValueError, match="content"):
        wm.reply("bad \udc80 byte", GREEDY)
