"""The tiers together: background writes, retrieval into the prompt, folding, isolation and deletion.

A real store in a temp DB and the toy checkpoint (float64): the model's words are noise, so the tests
read what memory put in front of it (the turns' system blocks, the summary, the store), and compare
generation on the kept state with a fresh run over the same transcript.
"""

from __future__ import annotations

import pytest
import torch
from helpers import serving
from helpers.toy import save_toy_checkpoint

from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.core.prompt import PromptTooLongError
from mamba_moe.memory import MemoryStore, MemoryStoreError
from mamba_moe.memory.conversation import ConversationBudget
from mamba_moe.memory.session import MemoryOptions, MemorySession, MemoryWriter, memory_block, system_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=6, temperature=0)
SMALL = MemoryOptions(budget=ConversationBudget(max_transcript_tokens=300, keep_recent_turns=1, max_block_tokens=200))


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    seed = serving.TOY_SEED      # module-scoped, so seeded here: MAMBA_MOE_TEST_SEED replays it
    print(f"toy checkpoint seed: {seed} (replay with MAMBA_MOE_TEST_SEED={seed})")
    path = save_toy_checkpoint(tmp_path_factory.mktemp("toy"), max_position_embeddings=1024, seed=seed)
    return Engine.from_pretrained(path, dtype=torch.float64, prefill_chunk=64)


@pytest.fixture
def store(tmp_path):
    with MemoryStore(tmp_path / "memory.db") as store:
        yield store


def context_of(session: MemorySession) -> str:
    """Everything the model has in front of it: the header (system prompt + summary) and every turn."""
    return "\n".join([session.working.system or ""] + [t.text for t in session.working.turns])


def test_facts_are_written_in_the_background_and_retrieved_later(engine, store):
    chat = MemorySession(engine, store, "ada", system="You are helpful.")
    chat.reply("Hello! My name is Ada and I live in Paris.", GREEDY)
    chat.close()                                              # flushes the writer
    assert store.current("ada", "name").value == "Ada" and store.current("ada", "city").value == "Paris"
    later = MemorySession(engine, store, "ada")
    later.reply("Where do I live?", GREEDY)
    block = later.working.turns[0].messages[0]
    assert block["role"] == "system" and "The user lives in Paris." in block["content"]
    assert system_tokens(engine)(block["content"]) <= later.options.budget.max_block_tokens
    later.reply("Where do I live again?", GREEDY)              # already in context: not injected twice
    assert [m["role"] for m in later.working.turns[1].messages] == ["user", "assistant"]
    later.close()


def test_one_users_facts_never_reach_another(engine, store):
    ada = MemorySession(engine, store, "ada")
    ada.reply("My name is Ada. I live in Paris.", GREEDY)
    ada.close()
    bob = MemorySession(engine, store, "bob")
    bob.reply("What is my name? Where do I live? Paris? Ada?", GREEDY)
    bob.close()
    assert [m["role"] for m in bob.working.turns[0].messages] == ["user", "assistant"]
    assert store.list("bob") == [] and store.current("bob", "name") is None


def test_long_chats_fold_into_a_bounded_summary(engine, store):
    chat = MemorySession(engine, store, "ada", session="s1", options=SMALL)
    chat.reply("My name is Ada.", GREEDY)
    count = system_tokens(engine)
    for i in range(8):
        covered = chat.conversation.covers_turns
        chat.reply(f"Tell me a story about the number {i}. The quick brown fox jumps over the lazy dog.", GREEDY)
        assert chat.working.seen_tokens <= engine.max_context
        # all that memory injected this turn: its block, and the summary if this turn folded
        first = chat.working.turns[-1].messages[0]
        injected = count(first["content"]) if first["role"] == "system" else 0
        if chat.conversation.covers_turns > covered:
            injected += count(chat.conversation.block(count))
        assert injected <= SMALL.budget.max_block_tokens
    chat.barrier()
    assert chat.conversation.covers_turns > 0
    summary = chat.conversation.block(count)
    assert "The user's name is Ada." in summary and count(summary) <= SMALL.budget.max_block_tokens
    saved = store.summary("ada", "s1")
    assert saved is not None and saved[1] == chat.conversation.covers_turns and "Ada" in saved[0]
    # after the rebuild the kept state still equals a fresh run over the working transcript
    prompt = chat.working.transcript_ids() + chat.working._encode([{"role": "user", "content": "Go on."}], True)
    expected = engine.generate(prompt, GREEDY).token_ids
    assert chat.working.reply("Go on.", GREEDY).token_ids == expected
    chat.close()
    resumed = MemorySession(engine, store, "ada", session="s1", options=SMALL)   # a restart resumes the summary
    assert "The user's name is Ada." in resumed.working.system


def test_a_deleted_fact_leaves_every_tier_also_after_a_restart(engine, store):
    chat = MemorySession(engine, store, "ada", session="s2", options=SMALL)
    chat.reply("I live in Paris.", GREEDY)
    for i in range(6):                                        # enough turns to fold "Paris" into the summary
        chat.reply(f"Tell me about the number {i}, please, in some detail.", GREEDY)
    chat.barrier()
    assert "The user lives in Paris." in chat.conversation.to_text()
    chat.reply("Do you remember where I live?", GREEDY)       # retrieval may show the fact again
    chat.reply("Please forget where I live.", GREEDY)         # applied and purged before this reply
    chat.close()
    assert store.current("ada", "city") is None and store.history("ada", "city") == []
    assert "paris" not in context_of(chat).casefold()
    assert "paris" not in chat.conversation.to_text().casefold()
    assert all(k <= len(chat.working.turns) for k in chat.working.snapshots)
    saved = store.summary("ada", "s2")
    assert saved is None or "paris" not in saved[0].casefold()
    restarted = MemorySession(engine, store, "ada", session="s2", options=SMALL)
    restarted.reply("Where do I live?", GREEDY)
    restarted.close()
    assert "paris" not in context_of(restarted).casefold()


def test_the_memory_block_stays_within_its_token_budget(engine, store, fresh_seed):
    import random

    rng = random.Random(fresh_seed)
    words = "the user likes tea lives in paris works at a small bakery near the river on weekends".split()
    for i in range(40):
        store.add("ada", f"Note {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + ".",
                  kind="note")
    for i in range(4):
        store.add_document("ada", f"doc{i}.txt", " ".join(rng.choice(words) for _ in range(3000)))
    count = system_tokens(engine)
    for limit in (1024, 300):
        hits, docs = store.search("ada", "tea paris bakery", k=40), store.search_documents("ada", "tea", k=10)
        block, shown = memory_block(hits, docs, count, limit)
        assert block and count(block) <= limit and shown
        assert all(r.text in block for r in shown)
        assert "[doc" in block or limit < 1024     # facts and chunks take turns: neither crowds the other out


def test_forget_everything_empties_every_tier(engine, store):
    chat = MemorySession(engine, store, "ada", session="s3", options=SMALL)
    for text in ["My name is Ada.", "I live in Rome.", "I work at Acme.", "Tell me a long story, please.",
                 "And another one about the sea.", "One more about the stars."]:
        chat.reply(text, GREEDY)
    chat.barrier()
    assert not chat.conversation.empty and store.list("ada")
    chat.reply("Please forget everything about me.", GREEDY)
    chat.close()
    assert store.list("ada", include_superseded=True) == [] and store.summary("ada", "s3") is None
    assert chat.conversation.empty and len(chat.working.turns) == 1 and chat.working.system is None
    assert chat.working.turns[0].messages[0]["content"] == "Please forget everything about me."


def test_deletions_made_elsewhere_are_purged_at_the_next_turn(engine, store, tmp_path):
    chat = MemorySession(engine, store, "ada")
    chat.reply("My favourite colour is green.", GREEDY)
    chat.barrier()
    with MemoryStore(tmp_path / "memory.db") as other:       # e.g. `mamba-moe memory forget` meanwhile
        assert other.forget("ada", query="favourite colour") == 1
    chat.reply("Hello again.", GREEDY)
    chat.close()
    assert "green" not in context_of(chat).casefold()


def test_a_message_too_long_for_the_context_changes_nothing(engine, store):
    chat = MemorySession(engine, store, "ada")
    chat.reply("Hello.", GREEDY)
    transcript = chat.working.transcript_ids()
    for text in ("My name is Zed. " + "word " * 2000, "My name is Zed. " + "x" * (10 << 20)):   # 10 MB: by length
        with pytest.raises(PromptTooLongError, match="message"):
            chat.reply(text, GREEDY)
    chat.close()
    assert chat.working.transcript_ids() == transcript and chat.conversation.empty
    assert store.list("ada") == []


class BrokenStore:
    """A store whose every call fails, like a DB that went away under the server."""

    def __init__(self, store):
        self.store = store

    def summary(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise OSError("disk I/O error")
        return fail


def test_a_failing_memory_degrades_the_turn_instead_of_failing_it(engine, store):
    chat = MemorySession(engine, BrokenStore(store), "ada")
    completion = chat.reply("My name is Ada.", GREEDY)          # retrieval fails, the write fails later
    chat.barrier()
    assert completion.finish_reason in ("stop", "length") and chat.degraded == 1
    assert chat.writer.failures == 1 and "disk I/O error" in chat.writer.last_error
    # a deletion that fails is an error, not a reply that might repeat what was to be deleted
    with pytest.raises(MemoryStoreError, match="deletion asked for failed"):
        chat.reply("Forget my name.", GREEDY)
    assert len(chat.working.turns) == 1
    chat.close()


def test_writer_runs_jobs_in_order_and_flushes_on_close():
    writer = MemoryWriter()
    seen = []
    for i in range(50):
        writer.submit(lambda i=i: seen.append(i))
    assert writer.call(lambda: len(seen)) == 50
    with pytest.raises(ZeroDivisionError):
        writer.call(lambda: 1 / 0)
    writer.submit(lambda: seen.append("last"))
    writer.close()
    assert seen[-1] == "last" and writer.failures == 1 and writer.pending == 0
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: None)


class CountingStore:
    """A real store that records which records each deletion check asked about, and every listing."""

    def __init__(self, store):
        self.store = store
        self.checked: list[set[int]] = []
        self.listings = 0

    def existing_ids(self, user, ids):
        self.checked.append(set(ids))
        return self.store.existing_ids(user, ids)

    def list(self, *args, **kwargs):
        self.listings += 1
        return self.store.list(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_turn_checks_only_new_records_while_nothing_was_deleted(engine, store, tmp_path):
    for i in range(50):   # other memories of the user: a turn must not look at them
        store.add("ada", f"note {i} about the garden", kind="note")
    counting = CountingStore(store)
    chat = MemorySession(engine, counting, "ada", options=MemoryOptions(k_facts=0, k_documents=0))
    chat.reply("My favourite colour is green.", GREEDY)
    chat.barrier()
    (green,) = chat.known
    chat.reply("Hello again.", GREEDY)            # first check: everything known
    assert counting.checked == [{green}]
    chat.reply("Nice weather.", GREEDY)           # nothing deleted, nothing new: no look-up at all
    assert counting.checked == [{green}]
    chat.reply("My favourite colour is blue.", GREEDY)
    chat.barrier()
    (blue,) = set(chat.known) - {green}
    chat.reply("Hello.", GREEDY)                  # only the record learnt of since
    assert counting.checked[1:] == [{blue}]
    with MemoryStore(tmp_path / "memory.db") as other:      # a deletion elsewhere moves the count
        assert other.forget("ada", ids=[green]) == 1
    chat.reply("Hello once more.", GREEDY)        # so everything known is checked, and green purged
    assert counting.checked[2:] == [{green, blue}]
    assert counting.listings == 0
    assert "green" not in context_of(chat).casefold() and set(chat.known) == {blue}
    chat.close()
