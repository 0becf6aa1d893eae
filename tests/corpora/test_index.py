import gzip
import itertools
import json

import pytest

from corpora.corpus import BUNDLED_PASSAGES, Passage, data_path, iter_passages
from corpora.index import BM25Index, build_index, read_meta
from corpora.pages import PageStore, window
from corpora.qa import load_qa


@pytest.fixture(scope="module")
def small_corpus():
    return list(itertools.islice(iter_passages(data_path(BUNDLED_PASSAGES)), 3000))


@pytest.fixture(scope="module")
def both_index(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "both"
    build_index(small_corpus, out, backends=("bm25", "rank_bm25"), show_progress=False)
    return BM25Index(out, "bm25"), BM25Index(out, "rank_bm25")


def test_backends_agree_on_top10(both_index):
    fast, ref = both_index
    questions = [q["question"] for q in load_qa("hotpotqa", limit=60)]
    a, b = fast.search(questions, k=10), ref.search(questions, k=10)
    for qa, qb in zip(a, b):
        assert [h.doc_id for h in qa] == [h.doc_id for h in qb]
        assert [h.score for h in qa] == pytest.approx([h.score for h in qb], rel=1e-5)


def test_batch_equals_single_and_shapes(both_index):
    fast, _ = both_index
    qs = ["Ed Wood director", "the of and", "", "Scott Derrickson"]
    batch = fast.search(qs, k=5)
    assert [fast.search([q], k=5)[0] for q in qs] == batch
    assert batch[1] == [] and batch[2] == []  # stop words only / empty: no hits, no error
    h = batch[0][0]
    assert h.title.startswith("Ed Wood") and isinstance(h.score, float) and h.score > 0
    with pytest.raises(TypeError, match="list of queries"):
        fast.search("Ed Wood", k=3)


def test_ties_broken_by_corpus_position(tmp_path):
    docs = [Passage(f"d{i}", "Same", "identical words here") for i in range(30)]
    docs += [Passage(f"x{i}", f"Other {i}", f"unrelated text number {i}") for i in range(40)]
    out = build_index(docs[::-1], tmp_path / "ties", backends=("bm25", "rank_bm25"), show_progress=False)
    for backend in ("bm25", "rank_bm25"):
        hits = BM25Index(out, backend).search(["identical words"], k=5)[0]
        # docs were indexed in reverse, so position order is d29, d28, ... (x* come first but do not match)
        assert [h.doc_id for h in hits] == ["d29", "d28", "d27", "d26", "d25"]


QUESTIONS = ["Ed Wood director", "Scott Derrickson nationality", "the Laleli Mosque"]


def test_old_backend_name_bm25s_is_an_alias_of_bm25(both_index, small_corpus, tmp_path):
    from corpora.retrievers import get_retriever, open_index

    fast, _ = both_index
    out = build_index(small_corpus[:500], tmp_path / "alias", backends=("bm25s", "rank_bm25", "bm25"), show_progress=False)
    assert read_meta(out)["backends"] == ["bm25", "rank_bm25"]  # new builds write the new name, once
    assert json.loads((out / "meta.json").read_text())["backends"] == ["bm25", "rank_bm25"]
    old, new = BM25Index(out, "bm25s"), BM25Index(out, "bm25")
    assert old.backend_name == new.backend_name == "bm25"
    assert old.search(QUESTIONS, k=5) == new.search(QUESTIONS, k=5) != [[], [], []]
    assert open_index(out, "bm25s").search(QUESTIONS, k=5) == new.search(QUESTIONS, k=5)
    assert get_retriever(str(out), "bm25s") is get_retriever(str(out), "bm25")  # one retriever, not two
    assert BM25Index(fast.folder, "bm25s").search(QUESTIONS, k=10) == fast.search(QUESTIONS, k=10)


def test_an_index_whose_meta_says_bm25s_loads(small_corpus, tmp_path):
    """Folders built before the rename say ``"backends": ["bm25s", ...]``: they load under either
    name, with the same hits, and no rebuild."""
    from corpora.retrievers import open_index

    out = build_index(small_corpus[:500], tmp_path / "old", backends=("bm25", "rank_bm25"), show_progress=False)
    want = BM25Index(out).search(QUESTIONS, k=5)
    meta = json.loads((out / "meta.json").read_text())
    meta["backends"] = ["bm25s", "rank_bm25"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert read_meta(out)["backends"] == ["bm25", "rank_bm25"]
    for backend in ("bm25", "bm25s"):
        idx = BM25Index(out, backend)
        assert idx.meta["backends"] == ["bm25", "rank_bm25"] and idx.search(QUESTIONS, k=5) == want
    assert BM25Index(out).search(QUESTIONS, k=5) == open_index(out).search(QUESTIONS, k=5) == want
    assert json.loads((out / "meta.json").read_text())["backends"] == ["bm25s", "rank_bm25"]  # read, not rewritten


def test_a_cache_folder_named_for_bm25s_is_reused(small_corpus, tmp_path, monkeypatch):
    from corpora import retrievers

    monkeypatch.setenv("WEBQA_GYM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "wiki_passages.jsonl"
    _write(corpus, [json.dumps({"id": p.id, "title": p.title, "text": p.text}) for p in small_corpus[:300]])
    fp = retrievers._file_fingerprint(corpus)
    legacy = tmp_path / "cache" / "indexes" / retrievers._cache_name(corpus, fp, "bm25s")
    build_index(corpus, legacy, show_progress=False)
    meta = json.loads((legacy / "meta.json").read_text())
    (legacy / "meta.json").write_text(json.dumps({**meta, "backends": ["bm25s"]}))
    for backend in ("bm25", "bm25s"):
        assert retrievers.cached_index_dir(corpus, (backend,)) == legacy  # no rebuild
    assert [p.name for p in (tmp_path / "cache" / "indexes").iterdir()] == [legacy.name]
    assert retrievers.resolve_index_dir(str(corpus), "bm25") == legacy


def test_a_format1_index_without_the_bm25s_library_names_the_install(small_corpus, tmp_path, monkeypatch):
    import sys

    out = build_index(small_corpus[:100], tmp_path / "f1", show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": 1, "backends": ["bm25s"]}))
    monkeypatch.setitem(sys.modules, "bm25s", None)  # import bm25s -> ImportError
    with pytest.raises(ImportError, match="pip install bm25s"):
        BM25Index(out)


def test_search_cli_takes_the_old_backend_name(both_index, capsys):
    from corpora.search import main

    fast, _ = both_index
    assert main(["--index", str(fast.folder), "--backend", "bm25s", "Ed Wood director", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "Ed Wood" in out and "1 queries" in out


def _write(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") if str(path).endswith(".gz") else open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def test_all_corpus_formats_give_the_same_index(tmp_path, small_corpus):
    docs = small_corpus[:200]
    ours, sr1, dpr = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl", tmp_path / "c.tsv"
    _write(ours, [json.dumps({"id": p.id, "title": p.title, "text": p.text}) for p in docs])
    _write(sr1, [json.dumps({"id": p.id, "contents": p.contents()}) for p in docs])
    _write(dpr, ["id\ttext\ttitle"] + [f"{p.id}\t{p.text}\t{p.title}" for p in docs if '"' not in p.text + p.title])
    assert list(iter_passages(ours)) == docs and list(iter_passages(sr1)) == docs
    dpr_docs = list(iter_passages(dpr))
    assert dpr_docs == [p for p in docs if '"' not in p.text + p.title] and dpr_docs
    r = [BM25Index(build_index(f, tmp_path / f"i{i}", show_progress=False)).search(["Ed Wood film"], 3) for i, f in enumerate([ours, sr1])]
    assert r[0] == r[1]


def test_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "title": "t", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        list(iter_passages(bad))
    with pytest.raises(FileNotFoundError):
        list(iter_passages(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown BM25 backend"):
        build_index([Passage("1", "t", "x")], tmp_path / "i", backends=("faiss",))
    dup = [Passage("1", "t", "x"), Passage("1", "u", "y")]
    with pytest.raises(ValueError, match="duplicate passage id"):
        build_index(dup, tmp_path / "d", show_progress=False)
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        BM25Index(tmp_path)
    assert not (tmp_path / "d").exists() and not (tmp_path / "i").exists()  # nothing half-written


def test_page_store_full_pages_and_passages(tmp_path):
    from corpora.retrievers import get_retriever

    idx = get_retriever("bundled")
    store = PageStore(idx)
    assert store.resolve("ed_wood") == "Ed Wood"
    assert store.resolve("https://en.wikipedia.org/wiki/Ed_Wood") == "Ed Wood"
    assert store.resolve("No Such Page 123") is None
    assert store.resolve("albedo") == "Albedo"
    full = store.text("Albedo")
    assert len(full.split()) > 3000  # the KILT full page, not one passage
    part1, n = window(full, 1, 100)
    assert n == -(-len(full.split()) // 100) and part1.split() == full.split()[:100]
    assert window(full, 999, 100)[0].split() == full.split()[(n - 1) * 100 :]
    # a title without a full page: its passages in corpus order
    t = store.resolve("Scott Derrickson")
    assert store.text(t).startswith("Scott Derrickson")
