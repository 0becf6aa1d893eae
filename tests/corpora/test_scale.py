"""The streamed, chunked index build (format 2): same bytes whatever the chunking, exact against
rank-bm25 (scores, order, ties, negative idf), old format-1 indexes still load."""
import itertools
import json

import numpy as np
import pytest

from corpora.corpus import BUNDLED_PASSAGES, Passage, data_path, iter_passages
from corpora.docstore import DocStore, DocStoreWriter
from corpora.index import BM25Index, build_index
from corpora.qa import load_qa
from corpora.streambuild import TermEncoder
from corpora.tokenize import tokenize
from corpora.vocab import Vocab, write_vocab


@pytest.fixture(scope="module")
def corpus():
    return list(itertools.islice(iter_passages(data_path(BUNDLED_PASSAGES)), 3000))


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    whole = build_index(corpus, root / "whole", backends=("bm25", "rank_bm25"), show_progress=False)
    enc = TermEncoder()
    n_words = sum(len(enc.encode(f"{p.title} {p.text}")) for p in corpus)  # chunks count words, stop words included
    # 3 pass-1 chunks (the "shards") and many pass-2 term blocks
    sharded = build_index(corpus, root / "sharded", show_progress=False, chunk_tokens=n_words // 3 + 1, block_postings=5000)
    return whole, sharded


def test_chunked_build_writes_the_same_index(built):
    whole, sharded = built
    assert json.loads((sharded / "meta.json").read_text())["num_chunks"] == 3
    assert json.loads((whole / "meta.json").read_text())["num_chunks"] == 1
    for name in ("indptr", "indices", "data"):
        a, b = np.load(whole / "postings" / f"{name}.npy"), np.load(sharded / "postings" / f"{name}.npy")
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert not list(sharded.rglob(".chunks"))


def test_sharded_search_equals_rank_bm25_exactly(built):
    whole, sharded = built
    fast, ref = BM25Index(sharded, "bm25"), BM25Index(whole, "rank_bm25")
    questions = [q["question"] for q in load_qa("hotpotqa", limit=60)] + ["Ed Wood film director", "the of and", ""]
    a, b = fast.search(questions, k=10), ref.search(questions, k=10)
    for qa, qb in zip(a, b):
        assert [h.doc_id for h in qa] == [h.doc_id for h in qb]
        assert [h.score for h in qa] == pytest.approx([h.score for h in qb], rel=1e-6)
    assert BM25Index(whole, "bm25").search(questions, k=10) == a


def test_ties_across_chunks_broken_by_global_position(tmp_path):
    docs = [Passage(f"x{i}", f"Other {i}", f"unrelated text number {i}") for i in range(20)]
    docs += [Passage(f"d{i}", "Same", "identical words here") for i in range(30)]
    docs = docs[::-1]  # positions: d29, d28, ..., d0, then x*
    ref = BM25Index(build_index(docs, tmp_path / "ref", backends=("rank_bm25",), show_progress=False), "rank_bm25")
    out = build_index(docs, tmp_path / "ties", show_progress=False, chunk_tokens=4, block_postings=3)  # a chunk a passage
    assert json.loads((out / "meta.json").read_text())["num_chunks"] == len(docs)
    hits = BM25Index(out).search(["identical words"], k=12)[0]
    assert [h.doc_id for h in hits] == [f"d{i}" for i in range(29, 17, -1)]
    ref_hits = ref.search(["identical words"], k=12)[0]
    assert [h.doc_id for h in ref_hits] == [h.doc_id for h in hits]
    assert [h.score for h in hits] == pytest.approx([h.score for h in ref_hits], rel=1e-6)


def test_negative_and_zero_idf_match_rank_bm25(tmp_path):
    # "common" is in 7 of 8 passages (negative Robertson idf: rank-bm25 floors it at 0.25 x mean idf);
    # "half" is in exactly 4 of 8 (idf exactly 0: contributes nothing, and must not break the kernel)
    docs = [Passage(str(i), f"T{i}", " ".join(["common"] * (i < 7) + ["half"] * (i % 2) + [f"word{i}", "rare" * (i == 3)]))
            for i in range(8)]
    out = build_index(docs, tmp_path / "i", backends=("bm25", "rank_bm25"), show_progress=False, chunk_tokens=5)
    fast, ref = BM25Index(out, "bm25"), BM25Index(out, "rank_bm25")
    qs = ["common", "common rare", "half", "half half half half half half half half half", "half word5", "common half word1"]
    for qa, qb in zip(fast.search(qs, k=8), ref.search(qs, k=8)):
        assert [h.doc_id for h in qa] == [h.doc_id for h in qb]
        assert [h.score for h in qa] == pytest.approx([h.score for h in qb], rel=1e-6)
    assert fast.search(["half half half"], k=3) == [[]]


def test_term_encoder_equals_the_tokeniser(corpus):
    enc = TermEncoder()
    for p in corpus[:500] + [Passage("u", "Ünïcode Straße", "naïve café 東京 running RUNS the of")]:
        text = f"{p.title} {p.text}"
        ids = enc.encode(text)
        terms = enc.terms()
        assert [terms[i] for i in ids if i >= 0] == tokenize(text)


def test_vocab_lookup(tmp_path):
    terms = ["zeta", "alpha", "été", "東京", "b", "ab", "a", "a_1", "10"]
    write_vocab(terms, tmp_path)
    v = Vocab(tmp_path)
    assert [v.get(t) for t in terms] == list(range(len(terms)))
    assert [v.term(i) for i in range(len(terms))] == terms
    assert v.get("zz") == v.get("") == v.get("aa") == v.get("0") == -1


def test_doc_store_streams_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(DocStoreWriter, "_FLUSH", 3)
    w = DocStoreWriter(tmp_path)
    docs = [Passage(str(i), f"t{i}", "é" * i) for i in range(10)]
    assert [w.add(p) for p in docs] == list(range(10))
    assert w.close() == 10
    assert list(DocStore(tmp_path)) == docs and not list(tmp_path.glob("*.raw"))


def test_format1_bm25s_index_still_loads(tmp_path, corpus):
    """An index written by the previous builder (bm25s library, format 1) loads and agrees."""
    bm25s = pytest.importorskip("bm25s")  # only format-1 folders need the library

    docs = corpus[:400]
    old = tmp_path / "old"
    old.mkdir()
    w = DocStoreWriter(old)
    titles = {}
    for p in docs:
        titles.setdefault(p.title, []).append(w.add(p))
    w.close()
    (old / "titles.json").write_text(json.dumps(titles))
    model = bm25s.BM25(k1=0.9, b=0.4, method="robertson")
    model.index([tokenize(f"{p.title} {p.text}") for p in docs], show_progress=False)
    model.save(str(old / "bm25s"))
    new = build_index(docs, tmp_path / "new", show_progress=False)
    meta = json.loads((new / "meta.json").read_text())
    meta.update(format=1, backends=["bm25s"])  # as format-1 builds wrote it: the old backend name
    (old / "meta.json").write_text(json.dumps(meta))
    a, b = BM25Index(old), BM25Index(new)
    assert a.format == 1 and b.format == 2
    qs = [q["question"] for q in load_qa("hotpotqa", limit=30)]
    for qa, qb in zip(a.search(qs, 5), b.search(qs, 5)):
        assert [h.doc_id for h in qa] == [h.doc_id for h in qb]
        assert [h.score for h in qa] == pytest.approx([h.score for h in qb], rel=1e-5)


def test_titles_json_lists_positions_in_corpus_order(tmp_path, corpus):
    docs = corpus[:300] + [Passage("again-0", corpus[0].title, "seen apart from its other passages")]
    out = build_index(docs, tmp_path / "t", show_progress=False)
    want: dict[str, list[int]] = {}
    for i, p in enumerate(docs):
        want.setdefault(p.title, []).append(i)
    got = json.loads((out / "titles.json").read_text(encoding="utf-8"))
    assert got == want and list(got) == list(want) and len(want[corpus[0].title]) > 1


@pytest.mark.parametrize("tile", [1, 7, 256, 100_000])
def test_tiled_kernel_gives_the_same_hits(built, tile):
    from corpora import kernels

    whole, sharded = built
    ref = BM25Index(whole, "rank_bm25")
    fast = BM25Index(sharded, "bm25")
    fast.backend.scratch = kernels.Scratch(len(fast), tile)
    questions = [q["question"] for q in load_qa("hotpotqa", limit=40)] + ["Ed Wood Ed Wood", "the of and"]
    batch = fast.search(questions, k=10)  # parallel path
    assert [fast.search([q], k=10)[0] for q in questions[:6]] == batch[:6]  # serial path
    for qa, qb in zip(batch, ref.search(questions, k=10)):
        assert [h.doc_id for h in qa] == [h.doc_id for h in qb]
        assert [h.score for h in qa] == pytest.approx([h.score for h in qb], rel=1e-6)
