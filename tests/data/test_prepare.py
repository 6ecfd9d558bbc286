"""prepare: sources, mixture, shards, manifest, split, dedup, incremental runs and bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from helpers.data import random_docs, random_text, tiny_tokenizer_dir, write_jsonl

from mamba_moe.data.config import DataError, PrepareConfig
from mamba_moe.data.prepare import is_validation, prepare
from mamba_moe.data.shards import load_manifest
from mamba_moe.data.sources import SkipLog, iter_documents, stdlib_files
from mamba_moe.data.tokenizer import load_tokenizer, raw_copy, tokenizer_hash


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer_dir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def rng(fresh_seed) -> random.Random:
    return random.Random(fresh_seed)


def _config(tok_dir: Path, out: Path, sources: list[dict], **kw) -> PrepareConfig:
    return PrepareConfig.from_dict({"tokenizer": str(tok_dir), "output": str(out), "sources": sources,
                                    "progress": False, "workers": 1, **kw})


def _read_docs(root: Path, manifest: dict, split: str | None = None, source: str | None = None) -> list[list[int]]:
    """Every document's ids (without the trailing separator), from the shards, in manifest order."""
    eos = manifest["tokenizer"]["eos_id"]
    out = []
    for shard in manifest["shards"]:
        if (split and shard["split"] != split) or (source and shard["source"] != source):
            continue
        tokens = np.fromfile(root / f"{shard['stem']}.bin", dtype=manifest["dtype"])
        offsets = np.load(root / f"{shard['stem']}.idx.npy")
        assert len(tokens) == shard["n_tokens"] == offsets[-1] and len(offsets) == shard["n_docs"] + 1
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            assert tokens[b - 1] == eos  # every document ends with the separator
            out.append(tokens[a:b - 1].tolist())
    return out


def _mixture(tmp_path: Path, rng: random.Random) -> tuple[list[dict], dict[str, list]]:
    """Files in a folder, a JSONL with text, a Parquet and a chat JSONL, each with its own domain."""
    folder = tmp_path / "code"
    (folder / "pkg").mkdir(parents=True)
    files = random_docs(rng, 12)
    for i, text in enumerate(files):
        (folder / ("pkg" if i % 2 else "") / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    web = random_docs(rng, 30)
    write_jsonl(tmp_path / "web.jsonl", [{"text": t, "id": i} for i, t in enumerate(web)])
    math = [f"{rng.randrange(10**6)} + {rng.randrange(10**6)} = ?" for _ in range(25)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": math}), tmp_path / "math.parquet", row_group_size=7)
    chats = [[{"role": "user", "content": random_text(rng, 8)}, {"role": "assistant", "content": random_text(rng, 8)}]
             for _ in range(10)]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats])
    sources = [
        {"name": "code", "kind": "files", "domain": "code", "paths": [str(folder)], "glob": "**/*.py"},
        {"name": "web", "kind": "jsonl", "domain": "web", "weight": 0.5, "paths": [str(tmp_path / "web.jsonl")]},
        {"name": "math", "kind": "parquet", "domain": "math", "paths": [str(tmp_path / "*.parquet")],
         "text_field": "content", "weight": 2},
        {"name": "chat", "kind": "jsonl", "domain": "chat", "paths": [str(tmp_path / "chat.jsonl")],
         "messages_field": "messages"},
    ]
    return sources, {"code": sorted(files, key=lambda t: files.index(t)), "web": web, "math": math, "chat": chats}


def test_mixture_counts_domains_and_exact_ids(tok_dir, tmp_path, rng):
    sources, raw = _mixture(tmp_path, rng)
    out = tmp_path / "out"
    result = prepare(_config(tok_dir, out, sources, val_fraction=0.2, shard_mb=0.002, dedup=False))
    manifest = load_manifest(out)
    tok = load_tokenizer(tok_dir)
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tok)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["llama_cpp_pre"] == "llama-bpe"
    assert [s["domain"] for s in manifest["sources"]] == ["code", "web", "math", "chat"]
    assert [s["weight"] for s in manifest["sources"]] == [1.0, 0.5, 2, 1.0]
    assert {s["domain"] for s in manifest["shards"]} == {"code", "web", "math", "chat"}
    assert result.shards_written == len(manifest["shards"]) > 4  # small shards: several per source

    enc = raw_copy(tok)
    for name in ("web", "math"):
        docs = _read_docs(out, manifest, source=name)
        expected = {tuple(enc.encode(t).ids) for t in raw[name]}
        assert sorted(map(tuple, docs)) == sorted(expected)
        want = sum(len(e) + 1 for e in expected)  # per-document encodings + one separator each
        got = sum(s["n_tokens"] for s in manifest["shards"] if s["source"] == name)
        assert got == want == sum(manifest["sources"][[s["name"] for s in sources].index(name)][sp]["tokens"]
                                  for sp in ("train", "val"))
    chats = _read_docs(out, manifest, source="chat")
    assert len(chats) == 10 and all(d[0] == 2 and d[-1] == enc.encode("\n").ids[-1] for d in chats)
    decoded = sorted(tok.decode(d) for d in chats)
    assert decoded == sorted("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in c)
                             for c in raw["chat"])
    totals = manifest["totals"]
    assert totals["train"]["docs"] + totals["val"]["docs"] == 12 + 30 + 25 + 10
    assert set(totals["train"]["by_domain"]) == {"code", "web", "math", "chat"}


def test_split_is_by_document_and_deterministic_for_a_seed(tok_dir, tmp_path, rng):
    docs = random_docs(rng, 200, 2, 20)
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    src = [{"name": "d", "kind": "jsonl", "paths": [str(tmp_path / "d.jsonl")]}]
    enc = raw_copy(load_tokenizer(tok_dir))

    def val_docs(out: str, seed: int) -> set[tuple[int, ...]]:
        prepare(_config(tok_dir, tmp_path / out, src, seed=seed, val_fraction=0.3, dedup=False))
        manifest = load_manifest(tmp_path / out)
        val = {tuple(d) for d in _read_docs(tmp_path / out, manifest, split="val")}
        train = {tuple(d) for d in _read_docs(tmp_path / out, manifest, split="train")}
        assert len(val) + len(train) == len({tuple(enc.encode(t).ids) for t in docs})  # each doc on one side
        assert not (val & train)
        return val

    seed = rng.randrange(1000)
    first = val_docs("a", seed)
    assert val_docs("b", seed) == first
    assert val_docs("c", seed + 1) != first
    assert 0.15 < len(first) / len(set(docs)) < 0.45
    # the rule is a pure function of content and seed
    assert is_validation(b"x" * 16, seed, 0.0) is False


def test_parallel_run_is_byte_identical_and_incremental(tok_dir, tmp_path, rng):
    sources, _ = _mixture(tmp_path, rng)
    one, two = tmp_path / "one", tmp_path / "two"
    prepare(_config(tok_dir, one, sources, shard_mb=0.002))
    result = prepare(_config(tok_dir, two, sources, shard_mb=0.002, workers=2))
    stems = [s["stem"] for s in load_manifest(one)["shards"]]
    assert stems == [s["stem"] for s in load_manifest(two)["shards"]]
    for stem in stems:
        for ext in (".bin", ".idx.npy"):
            assert (one / f"{stem}{ext}").read_bytes() == (two / f"{stem}{ext}").read_bytes()

    again = prepare(_config(tok_dir, two, sources, shard_mb=0.002, workers=2))
    assert (again.shards_written, again.shards_reused) == (0, result.shards_written)

    # an interrupted run: one shard lost its sidecar, another's token file was cut short, a temp file remains
    (two / f"{stems[0]}.json").unlink()
    cut = two / f"{stems[-1]}.bin"
    cut.write_bytes(cut.read_bytes()[:-2])
    (two / f"{stems[1]}.bin.tmp-999").write_bytes(b"partial")
    again = prepare(_config(tok_dir, two, sources, shard_mb=0.002))
    assert again.shards_written == 2 and again.shards_reused == len(stems) - 2
    assert not list(two.rglob("*.tmp-*"))
    for stem in stems:
        assert (one / f"{stem}.bin").read_bytes() == (two / f"{stem}.bin").read_bytes()

    # a new document in one source rewrites only shards whose inputs changed
    web = tmp_path / "web.jsonl"
    web.write_text(web.read_text(encoding="utf-8") + json.dumps({"text": "one more document"}) + "\n")
    again = prepare(_config(tok_dir, two, sources, shard_mb=0.002))
    assert 1 <= again.shards_written <= 2

    # bigger shards: everything is rewritten and the old, now unlisted, shards are removed
    again = prepare(_config(tok_dir, two, sources, shard_mb=1.0))
    listed = {s["stem"] for s in load_manifest(two)["shards"]}
    on_disk = {str(p.relative_to(two))[: -len(".json")] for p in two.rglob("*.json") if p.name != "manifest.json"}
    assert on_disk == listed and len(listed) < len(stems) and "removed" in " ".join(again.warnings)


def test_dedup_removes_exact_duplicates_across_sources(tok_dir, tmp_path, rng):
    docs = random_docs(rng, 20)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs + docs[:5]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in docs[:3]])
    src = [{"name": "a", "kind": "jsonl", "paths": [str(tmp_path / "a.jsonl")]},
           {"name": "b", "kind": "jsonl", "paths": [str(tmp_path / "b.jsonl")]}]
    result = prepare(_config(tok_dir, tmp_path / "o", src, val_fraction=0))
    m = result.manifest
    assert m["totals"]["train"]["docs"] == len(set(docs))
    dup = m["skips"]["skipped"]
    assert dup["a"]["duplicate"]["count"] == 5 + len(docs) - len(set(docs))
    assert dup["b"]["duplicate"]["count"] == 3
    assert "b" in " ".join(w for w in result.warnings)  # source b ended up empty: reported
    kept = prepare(_config(tok_dir, tmp_path / "k", src, val_fraction=0, dedup=False)).manifest
    assert kept["totals"]["train"]["docs"] == 20 + 5 + 3


def test_bad_input_is_counted_and_reported_never_fatal(tok_dir, tmp_path, rng):
    folder = tmp_path / "txt"
    folder.mkdir()
    good = random_docs(rng, 5)
    for i, text in enumerate(good):
        (folder / f"ok{i}.txt").write_text(text, encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("  \n\t\n")
    (folder / "dangling.txt").symlink_to(tmp_path / "missing-target")  # unreadable
    (folder / "legacy.py").write_bytes("# -*- coding: latin-1 -*-\nx = 'caf\xe9'\n".encode("latin-1"))
    lines = [json.dumps({"text": t}) for t in random_docs(rng, 4)]
    lines += ['{"txt": "wrong field"}', '{"text": 12}', '{"text": ""}', "{not json", '["a list"]', "",
              '{"text": null}']
    (tmp_path / "r.jsonl").write_bytes("\n".join(lines).encode() + b"\n{\"text\": \"bad \xff byte\"}\n")
    with gzip.open(tmp_path / "cut.jsonl.gz", "wb") as fh:
        fh.write(("\n".join(json.dumps({"text": t}) for t in random_docs(rng, 50)) + "\n").encode())
    blob = (tmp_path / "cut.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])  # truncated archive
    chats = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []},
             {"messages": [{"role": "user", "content": 3}]}, {"conv": []}]
    write_jsonl(tmp_path / "c.jsonl", chats)
    sources = [
        {"name": "txt", "kind": "files", "paths": [str(folder)]},
        {"name": "rec", "kind": "jsonl", "paths": [str(tmp_path / "r.jsonl"), str(tmp_path / "cut.jsonl.gz")]},
        {"name": "chat", "kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")], "messages_field": "messages"},
    ]
    result = prepare(_config(tok_dir, tmp_path / "out", sources, val_fraction=0, dedup=False))
    skipped = result.manifest["skips"]["skipped"]
    assert {k: v["count"] for k, v in skipped["txt"].items()} == {"non-utf8": 1, "empty": 2, "unreadable": 1}
    rec = {k: v["count"] for k, v in skipped["rec"].items()}
    assert rec["missing-field"] == 1 and rec["bad-record"] == 2 and rec["empty"] == 2
    assert rec["bad-json"] == 1 and rec["non-utf8"] == 1 and rec["unreadable"] == 1
    assert any("r.jsonl:5" in e for e in skipped["rec"]["missing-field"]["examples"])  # file and line named
    assert {k: v["count"] for k, v in skipped["chat"].items()} == {"bad-messages": 2, "missing-field": 1}
    notes = result.manifest["skips"]["notes"]
    assert notes["txt"]["pep263-decoded"]["count"] == 1
    report = result.report()
    assert "non-utf8" in report and "latin1.txt" in report
    docs = result.manifest["sources"]
    kept = {d["name"]: d["train"]["docs"] for d in docs}
    assert kept["txt"] == 5 + 1 and kept["chat"] == 1
    cut_kept = kept["rec"] - 4
    assert 0 < cut_kept < 50  # the readable part of the truncated archive is kept, the rest reported

    replace = dict(sources[0], encoding_errors="replace")
    again = prepare(_config(tok_dir, tmp_path / "out2", [replace], val_fraction=0, dedup=False))
    assert again.manifest["skips"]["notes"]["txt"]["utf8-replaced"]["count"] == 1
    assert again.manifest["sources"][0]["train"]["docs"] == 7


def test_invalid_text_in_any_source_is_skipped_with_file_and_line(tok_dir, tmp_path, rng):
    """A lone surrogate (valid JSON: "\\ud800") or a byte that is not UTF-8, in a text file, a JSONL line or a
    chat record, is one counted skip naming file:line; it used to abort the whole run in the tokenizer."""
    good = random_docs(rng, 6)
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "ok.txt").write_text(good[0], encoding="utf-8")
    (folder / "bad.txt").write_bytes(b"line one\nline two\nthree \xff\n")
    lines = [json.dumps({"text": t}) for t in good[1:4]]
    lines[1:1] = ['{"text": "lone \\ud800 surrogate"}', '{"text": "low \\udc80 half"}']
    lines.append('{"text": "fine pair \\ud83d\\ude00"}')  # a proper surrogate pair is one character: kept
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    chats = ['{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}',
             '{"messages": [{"role": "us\\udfffer", "content": "hi"}]}',
             json.dumps({"messages": [{"role": "user", "content": good[4]}, {"role": "assistant", "content": "ok"}]})]
    (tmp_path / "c.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    sources = [{"name": "txt", "kind": "files", "paths": [str(folder)]},
               {"name": "rec", "kind": "jsonl", "paths": [str(tmp_path / "r.jsonl")]},
               {"name": "chat", "kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")], "messages_field": "messages"}]
    result = prepare(_config(tok_dir, tmp_path / "out", sources, val_fraction=0, dedup=False))
    skipped = result.manifest["skips"]["skipped"]
    assert skipped["txt"]["non-utf8"]["count"] == 1
    assert skipped["txt"]["non-utf8"]["examples"] == [f"{folder / 'bad.txt'}:3: byte 24 (0xff) is not UTF-8"]
    bad = skipped["rec"]["invalid-text"]
    assert bad["count"] == 2 and [e.split(": ")[0] for e in bad["examples"]] == [f"{tmp_path / 'r.jsonl'}:{n}"
                                                                               for n in (2, 3)]
    assert "a lone surrogate U+D800 at character 5" in bad["examples"][0]
    assert "undecodable byte 0x80" in bad["examples"][1]  # U+DC80: how surrogateescape spells a bad byte
    chat = skipped["chat"]["invalid-text"]
    assert chat["count"] == 2 and "messages[0].content" in chat["examples"][0] and "messages[0].role" in chat[
        "examples"][1] and f"{tmp_path / 'c.jsonl'}:1" in chat["examples"][0]
    kept = {d["name"]: d["train"]["docs"] for d in result.manifest["sources"]}
    assert kept == {"txt": 1, "rec": 4, "chat": 1}
    assert "invalid-text" in result.report() and "r.jsonl:2" in result.report()
    enc = raw_copy(load_tokenizer(tok_dir))
    assert enc.encode("fine pair \U0001F600").ids in _read_docs(tmp_path / "out", result.manifest, source="rec")


def test_hf_source_that_fails_to_parse_is_counted_not_fatal(tok_dir, tmp_path, rng, monkeypatch):
    """datasets' JSON builder (pyarrow) refuses a file with a lone surrogate outright: the source ends with an
    'unreadable' skip and the other sources are prepared."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800"}\n', encoding="utf-8")
    write_jsonl(tmp_path / "fine.jsonl", [{"text": t} for t in random_docs(rng, 3)])
    sources = [{"name": "hf", "kind": "hf", "dataset": "json", "data_files": [str(tmp_path / "d.jsonl")]},
               {"name": "fine", "kind": "jsonl", "paths": [str(tmp_path / "fine.jsonl")]}]
    result = prepare(_config(tok_dir, tmp_path / "o", sources, val_fraction=0, dedup=False))
    unreadable = result.manifest["skips"]["skipped"]["hf"]["unreadable"]
    assert unreadable["count"] == 1 and unreadable["examples"][0].startswith("json:train[")
    assert {d["name"]: d["train"]["docs"] for d in result.manifest["sources"]}["fine"] == 3


def _tree_with_links(root: Path, rng: random.Random) -> dict[str, str]:
    """Nested folders, hidden names, a linked folder outside the tree; returns the text of each file."""
    texts = {}
    for rel in ("a.txt", "b.jsonl", "sub/c.txt", "sub/deep/d.txt", "sub/.hidden.txt", ".dot/e.txt", "x/y/z/f.txt",
                "ab[1].txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        texts[rel] = random_text(rng, 20) + rel
        (root / rel).write_text(texts[rel], encoding="utf-8")
    outside = root.parent / f"{root.name}-outside"
    (outside / "o").mkdir(parents=True)
    (outside / "o" / "g.txt").write_text("outside", encoding="utf-8")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return texts


@pytest.mark.parametrize("pattern", ["**/*.txt", "**", "*", "sub/**/*.txt", "*/*.txt", "**/d.txt", "sub/*/*",
                                     "**/.hidden.txt", ".*/*.txt", "?.txt", "[ab].*", "x/**/z/*", "**/o/*.txt"])
def test_glob_sources_match_what_glob_matches(tmp_path, rng, pattern):
    """Without loops, the loop-safe glob is glob.glob(recursive=True): wildcards, hidden names, linked folders."""
    import glob as globlib

    from mamba_moe.data.sources import glob_files

    root = tmp_path / "tree"
    _tree_with_links(root, rng)
    full = str(root / pattern)
    assert sorted(glob_files(full)) == sorted(Path(p) for p in globlib.glob(full, recursive=True))


def test_glob_source_with_a_symlink_loop_finishes(tok_dir, tmp_path, rng):
    """glob.glob follows directory links under **, so a link back to an ancestor never finished; the loop is
    now cut, noted with its path, and every real file is read once."""
    root = tmp_path / "tree"
    texts = _tree_with_links(root, rng)
    (root / "sub" / "deep" / "up").symlink_to(root, target_is_directory=True)   # loop to the top
    (root / "sub" / "self").symlink_to(".", target_is_directory=True)         # loop to itself
    src = {"name": "g", "kind": "files", "paths": [str(root / "**" / "*.txt")]}
    result = prepare(_config(tok_dir, tmp_path / "out", [src], val_fraction=0, dedup=False))
    docs = result.manifest["sources"][0]["train"]["docs"]
    visible = [rel for rel in texts if rel.endswith(".txt") and not any(p.startswith(".") for p in rel.split("/"))]
    assert docs == len(visible) + 1  # + the file of the linked outside folder
    loops = result.manifest["skips"]["notes"]["g"]["symlink-loop"]
    assert loops["count"] == 2 and sorted(e.split(": ")[0] for e in loops["examples"]) == sorted(
        [str(root / "sub" / "deep" / "up"), str(root / "sub" / "self")])
    assert "symlink-loop" in result.report()
    # The folder form (pathlib's glob) finished before: its ** follows no directory link at all, and it matches
    # hidden names (a documented difference between the two forms).
    folder = {"name": "g", "kind": "files", "paths": [str(root)], "glob": "**/*.txt"}
    again = prepare(_config(tok_dir, tmp_path / "out2", [folder], val_fraction=0, dedup=False))
    assert again.manifest["sources"][0]["train"]["docs"] == len(visible) + 2  # + .hidden.txt, .dot/e.txt


def test_configuration_errors_come_before_any_work(tok_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"sources\[0\].paths: no file matches .*nothing-here"):
        prepare(_config(tok_dir, out, [{"name": "a", "kind": "files", "paths": [str(tmp_path / "nothing-here")]}]))
    assert not out.exists()
    (tmp_path / "e.txt").write_text("   ")
    with pytest.raises(DataError, match="empty corpus"):
        prepare(_config(tok_dir, out, [{"name": "a", "kind": "files", "paths": [str(tmp_path / "e.txt")]}]))
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="did you mean 'text_field'"):
        _config(tok_dir, out, [{"name": "a", "kind": "jsonl", "paths": ["x"], "txt_field": "t"}])
    with pytest.raises(DataError, match="did you mean 'val_fraction'"):
        _config(tok_dir, out, [{"name": "a", "kind": "stdlib"}], val_fraktion=0.1)
    with pytest.raises(DataError, match="did you mean 'parquet'"):
        _config(tok_dir, out, [{"name": "a", "kind": "parket", "paths": ["x"]}])
    with pytest.raises(DataError, match=r"sources\[0\].streaming: must be true or false"):
        _config(tok_dir, out, [{"name": "a", "kind": "hf", "dataset": "json", "streaming": "no"}])
    with pytest.raises(DataError, match="paths: must be a list"):
        _config(tok_dir, out, [{"name": "a", "kind": "files", "paths": [3]}])
    with pytest.raises(DataError, match="used twice"):
        _config(tok_dir, out, [{"name": "a", "kind": "stdlib"}, {"name": "a", "kind": "stdlib"}])
    with pytest.raises(DataError, match="missing required"):
        PrepareConfig.from_dict({"output": "x", "sources": []})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tokenizer: {tok_dir}\noutput: {out}\nsources:\n  - name: s\n    kind: stdlib\n    wieght: 2\n")
    with pytest.raises(DataError, match=r"c.yaml: sources\[0\].wieght: unknown key; did you mean 'weight'"):
        PrepareConfig.load(cfg)


def test_hf_datasets_source_streams_local_files(tok_dir, tmp_path, rng, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    pytest.importorskip("datasets")
    docs = random_docs(rng, 15)
    write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in docs])
    src = {"name": "hf", "kind": "hf", "dataset": "json", "data_files": [str(tmp_path / "d.jsonl")],
           "split": "train", "streaming": True, "text_field": "body", "domain": "web", "max_docs": 12}
    result = prepare(_config(tok_dir, tmp_path / "o", [src], val_fraction=0, dedup=False))
    enc = raw_copy(load_tokenizer(tok_dir))
    got = _read_docs(tmp_path / "o", result.manifest)
    assert got == [enc.encode(t).ids for t in docs[:12]]


def test_stdlib_source_is_code_and_skips_tests():
    files = stdlib_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests"} & set(f.parts) for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert len(stdlib_files(include_tests=True)) > len(files)
    from mamba_moe.data.config import SourceConfig

    log = SkipLog()
    src = SourceConfig(name="std", kind="stdlib", domain="code", max_docs=7)
    assert len(list(iter_documents(src, log))) == 7
    assert os.path.commonpath([str(f) for f in files[:2]])


def test_prepare_stdlib_for_demos(tok_dir, tmp_path):
    from mamba_moe.data.loader import PackedDataset
    from mamba_moe.data.prepare import prepare_stdlib

    result = prepare_stdlib(tok_dir, tmp_path / "std", max_docs=40, workers=2, shard_mb=0.05, val_fraction=0.1)
    m = result.manifest
    dups = m["skips"]["skipped"].get("stdlib", {}).get("duplicate", {}).get("count", 0)  # __phello__ has copies
    assert m["sources"][0]["domain"] == "code"
    assert m["totals"]["train"]["docs"] + m["totals"]["val"]["docs"] + dups == 40  # max_docs counts before dedup
    assert prepare_stdlib(tok_dir, tmp_path / "std", max_docs=40, workers=2, shard_mb=0.05,
                          val_fraction=0.1).shards_written == 0
    assert len(PackedDataset(tmp_path / "std", seq_len=64, tokenizer=load_tokenizer(tok_dir))) > 10


def test_token_dtype_follows_vocabulary(tok_dir, tmp_path, rng):
    from mamba_moe.data.tokenizer import token_dtype_bits

    assert (token_dtype_bits(65_536), token_dtype_bits(65_537), token_dtype_bits(32_000)) == (16, 32, 16)
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in random_docs(rng, 5)])
    src = [{"name": "d", "kind": "jsonl", "paths": [str(tmp_path / "d.jsonl")]}]
    m = prepare(_config(tok_dir, tmp_path / "o", src, val_fraction=0, dtype="uint32")).manifest
    assert m["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "o" / f"{m['shards'][0]['stem']}.bin", dtype="<u4")
    assert len(tokens) == m["totals"]["train"]["tokens"] and tokens.max() < m["tokenizer"]["vocab_size"]
