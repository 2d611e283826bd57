#!/usr/bin/env python3
"""Checks a `negcache export` with numpy and safetensors alone.

    python3 tests/python/check_export.py --export DIR --data BEIR_DIR \
        --split test --eval-json EVAL.json

DIR is what `negcache export --checkpoint C --split SPLIT --out DIR` wrote;
EVAL.json is what `negcache eval --checkpoint C --split SPLIT --json EVAL.json`
wrote. The script

1. loads `embeddings.safetensors` with `safetensors.numpy.load_file` and the
   ids files beside it;
2. scores every exported query against every item by dot product, in f32
   with negcache's summation order (metadata key `dot`), so the scores are
   the ones `negcache eval` computes, bit for bit;
3. ranks as `negcache eval` does (metadata key `ranking`): highest score
   first, equal scores by the larger document id first (trec_eval's order),
   the document whose id is the query's id dropped (BEIR's
   ignore_identical_ids), and with exclude_train the query's train
   positives dropped;
4. computes Recall@10 from the BEIR qrels of the split as BEIR / trec_eval
   do (relevant: grade > 0, the highest grade of a repeated pair; mean over
   the queries with a relevant judgement) and requires it to equal the
   "towers" Recall@10 of EVAL.json within 1e-6;
5. does the same with a plain `queries @ items.T` (BLAS, another summation
   order), whose top 10 may differ only where two scores are within float
   rounding of each other at the cut;
6. recomputes the embeddings from `weights.safetensors` and the exported
   token ids with the formula in its metadata (key `forward`), in float64,
   and requires them within 1e-5 of the exported ones.

Exit status: 0 when every check passes, 1 when one fails, 2 when the inputs
cannot be used. Needs numpy and safetensors (tests/python/requirements.txt).
The cargo test host/tests/export.rs runs it when both are importable.
"""

import argparse
import gzip
import json
import pathlib
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

K = 10
RECALL_TOLERANCE = 1e-6
# Largest difference between the exported f32 embeddings and a float64
# recomputation from the weights: a few f32 roundings of values below 1
# (measured differences are about 1e-7).
WEIGHTS_TOLERANCE = 1e-5
# Two scores closer than this may swap places under another summation
# order (f32 dot products of unit vectors; rounding is below 1e-6).
NEAR_TIE = 1e-5


class Unusable(Exception):
    """The inputs cannot be checked (exit status 2)."""


def read_ids(path):
    text = path.read_text(encoding="utf-8")
    ids = text.split("\n")
    if ids and ids[-1] == "":
        ids.pop()
    return ids


def open_text(plain):
    if plain.exists():
        return open(plain, encoding="utf-8")
    gz = plain.with_name(plain.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rt", encoding="utf-8")
    raise Unusable(f"missing file: neither {plain} nor {gz} exists")


def read_qrels(data, split):
    """query id -> {doc id: highest grade}, as negcache's BEIR reader."""
    qrels = {}
    with open_text(pathlib.Path(data) / "qrels" / f"{split}.tsv") as f:
        first = True
        for line in f:
            if not line.strip():
                continue
            fields = [x.strip() for x in line.split("\t")] if "\t" in line else line.split()
            if len(fields) != 3:
                raise Unusable(f"qrels line with {len(fields)} fields: {line!r}")
            q, d, s = fields
            try:
                grade = int(s)
            except ValueError:
                if first:
                    first = False
                    continue
                raise Unusable(f"qrels score {s!r} is not an integer")
            first = False
            by_doc = qrels.setdefault(q, {})
            by_doc[d] = max(grade, by_doc.get(d, grade))
    return qrels


def negcache_dot(queries, items):
    """f32 scores with negcache::vector::dot's summation order: four partial
    sums over the components i % 4 == j (the tail, if any, into the first),
    then (s0 + s1) + (s2 + s3). Each numpy operation rounds to f32, and none
    is fused, so the result is the Rust one bit for bit."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    d = np.ascontiguousarray(items, dtype=np.float32)
    dim = q.shape[1]
    acc = [np.zeros((q.shape[0], d.shape[0]), dtype=np.float32) for _ in range(4)]
    full = dim - dim % 4
    for i in range(0, full, 4):
        for j in range(4):
            acc[j] += np.multiply.outer(q[:, i + j], d[:, i + j])
    for i in range(full, dim):
        acc[0] += np.multiply.outer(q[:, i], d[:, i])
    return (acc[0] + acc[1]) + (acc[2] + acc[3])


def top_k(scores, allowed, tie_key, k):
    """Indices of the k best allowed documents: score descending, then
    tie_key ascending (tie_key orders ids by decreasing bytes)."""
    idx = np.nonzero(allowed)[0]
    s = scores[idx]
    if len(idx) > k:
        # Everything that scores at least the k-th best, ties included.
        kth = np.partition(s, len(s) - k)[len(s) - k]
        keep = s >= kth
        idx, s = idx[keep], s[keep]
    order = np.lexsort((tie_key[idx], -s.astype(np.float64)))
    return idx[order[:k]]


def recall_per_query(scores_fn, qids, item_ids, qrels, excluded, tie_key, chunk=256):
    """{query id: (Recall@10, ranking)} for the exported queries with a
    relevant judgement."""
    row_of = {q: i for i, q in enumerate(qids)}
    judged = [q for q, docs in qrels.items() if any(g > 0 for g in docs.values())]
    missing = [q for q in judged if q not in row_of]
    if missing:
        raise Unusable(f"{len(missing)} judged queries were not exported, e.g. {missing[0]!r}")
    doc_row = {d: i for i, d in enumerate(item_ids)}
    rows = sorted(row_of[q] for q in judged)
    out = {}
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        scores = scores_fn(part)
        for r, row in enumerate(part):
            q = qids[row]
            allowed = np.ones(len(item_ids), dtype=bool)
            for d in excluded.get(q, ()):
                if d in doc_row:
                    allowed[doc_row[d]] = False
            top = top_k(scores[r], allowed, tie_key, K)
            relevant = {d for d, g in qrels[q].items() if g > 0}
            found = sum(1 for i in top if item_ids[i] in relevant)
            out[q] = (found / len(relevant), top, scores[r])
    return out


def tower_outputs(w, prefix_table, prefix_mlp, tokens, pad, activation, pooling, chunk=4096):
    """The tower of weights.safetensors' `forward` formula, in float64."""
    table = w[f"{prefix_table}.weight"].astype(np.float64)
    w0 = w[f"{prefix_mlp}.0.weight"].astype(np.float64)
    b0 = w[f"{prefix_mlp}.0.bias"].astype(np.float64)
    w2 = w[f"{prefix_mlp}.2.weight"].astype(np.float64)
    b2 = w[f"{prefix_mlp}.2.bias"].astype(np.float64)
    act = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh, "identity": lambda x: x}[activation]
    out = []
    for start in range(0, len(tokens), chunk):
        t = tokens[start:start + chunk]
        used = t != pad
        rows = table[(t.astype(np.int64) % table.shape[0])] * used[..., None]
        e = rows.sum(axis=1)
        if pooling == "mean":
            n = used.sum(axis=1, keepdims=True)
            e = np.where(n > 0, e / np.maximum(n, 1), 0.0)
        y = act(e @ w0.T + b0) @ w2.T + b2
        norm = np.linalg.norm(y, axis=1, keepdims=True)
        out.append(np.where(norm > 0, y / np.where(norm > 0, norm, 1.0), 0.0))
    return np.concatenate(out) if out else np.zeros((0, w2.shape[0]))


def check(args):
    export = pathlib.Path(args.export)
    emb_path = export / "embeddings.safetensors"
    with safe_open(str(emb_path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "negcache-embeddings-v1":
        raise Unusable(f"{emb_path}: format {meta.get('format')!r}, not negcache-embeddings-v1")
    emb = load_file(str(emb_path))
    items, queries = emb["item_embeddings"], emb.get("query_embeddings")
    if queries is None:
        raise Unusable(f"{emb_path}: no query_embeddings (export with --split)")
    item_ids = read_ids(export / meta["item_ids"])
    qids = read_ids(export / meta["query_ids"])
    if len(item_ids) != items.shape[0] or len(qids) != queries.shape[0]:
        raise Unusable("the ids files and the tensors disagree in length")
    if items.dtype != np.float32 or meta.get("normalization") != "l2":
        raise Unusable("expected f32, L2-normalised embeddings")
    split = args.split or meta.get("split")
    with open(args.eval_json, encoding="utf-8") as f:
        ev = json.load(f)
    expected = ev["towers"]["recall_at_10"]
    protocol = ev.get("protocol") or json.loads(meta["protocol"])
    if protocol.get("merge_identical_text"):
        raise Unusable("merge_identical_text is not reproduced here")

    qrels = read_qrels(args.data, split)
    excluded = {}
    if protocol.get("ignore_identical_ids", True):
        ids = set(item_ids)
        for q in qids:
            if q in ids:
                excluded.setdefault(q, set()).add(q)
    if protocol.get("exclude_train"):
        for q, docs in read_qrels(args.data, "train").items():
            excluded.setdefault(q, set()).update(d for d, g in docs.items() if g > 0)

    # trec_eval's tie order: among equal scores the larger id (bytes) first.
    order = sorted(range(len(item_ids)), key=lambda i: item_ids[i].encode("utf-8"), reverse=True)
    tie_key = np.empty(len(item_ids), dtype=np.int64)
    tie_key[order] = np.arange(len(item_ids))

    failures = []
    exact = recall_per_query(lambda rows: negcache_dot(queries[rows], items), qids, item_ids, qrels, excluded, tie_key)
    recall = float(np.mean([r for r, _, _ in exact.values()]))
    line = f"Recall@10 over {len(exact)} queries: numpy {recall:.6f}, negcache eval {expected:.6f}"
    if abs(recall - expected) > RECALL_TOLERANCE:
        failures.append(f"{line}: differ by {abs(recall - expected):.3g} > {RECALL_TOLERANCE}")
    print(f"check_export: {line}")

    plain = recall_per_query(lambda rows: queries[rows] @ items.T, qids, item_ids, qrels, excluded, tie_key)
    near_ties = 0
    for q, (_, top, _) in plain.items():
        _, exact_top, scores = exact[q]
        if set(top) != set(exact_top):
            # Allowed only when the cut falls between near-equal scores.
            inside = scores[exact_top]
            outside = [scores[i] for i in top if i not in set(exact_top)]
            if max(outside) < inside.min() - NEAR_TIE:
                failures.append(f"query {q}: a plain dot product retrieves a different top {K}")
            near_ties += 1
    plain_recall = float(np.mean([r for r, _, _ in plain.values()]))
    print(
        f"check_export: plain queries @ items.T: Recall@10 {plain_recall:.6f} "
        f"({near_ties} queries differ at a near-tie at the cut)"
    )
    if near_ties == 0 and abs(plain_recall - expected) > RECALL_TOLERANCE:
        failures.append(f"plain dot product Recall@10 {plain_recall} differs from {expected}")

    norms = np.linalg.norm(items.astype(np.float64), axis=1)
    if not np.all((np.abs(norms - 1.0) < 1e-5) | (norms == 0.0)):
        failures.append("an item embedding is neither unit-length nor zero")

    wpath = export / "weights.safetensors"
    with safe_open(str(wpath), framework="numpy") as f:
        wmeta = f.metadata() or {}
    w = load_file(str(wpath))
    pad = int(wmeta["pad_token"])
    sides = [("item", emb["item_tokens"], items)]
    if "query_tokens" in emb:
        sides.append(("query", emb["query_tokens"], queries))
    for side, tokens, stored in sides:
        table, mlp = [p.split(".")[0] for p in wmeta[f"{side}_tower"].split(", ")[:2]]
        again = tower_outputs(w, table, mlp, tokens, pad, wmeta["activation"], wmeta["pooling"])
        diff = float(np.max(np.abs(again - stored))) if len(stored) else 0.0
        print(f"check_export: {side} embeddings from the weights: largest difference {diff:.3g}")
        if diff > WEIGHTS_TOLERANCE:
            failures.append(f"{side} embeddings recomputed from the weights differ by {diff} > {WEIGHTS_TOLERANCE}")
    return failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="directory written by negcache export --split SPLIT")
    p.add_argument("--data", required=True, help="the BEIR dataset directory (for its qrels)")
    p.add_argument("--split", help="the split (default: the export's)")
    p.add_argument("--eval-json", required=True, help="file written by negcache eval --json")
    args = p.parse_args()
    try:
        failures = check(args)
    except (Unusable, KeyError, OSError) as e:
        print(f"check_export: cannot check: {e!r}", file=sys.stderr)
        return 2
    for f in failures:
        print(f"check_export: FAIL: {f}", file=sys.stderr)
    if failures:
        return 1
    print("check_export: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
