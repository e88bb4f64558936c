"""The reranker: for each query, judge every first-stage candidate (explanation + label), then sort.

Score = the expected label under the model's distribution over the three label tokens at the
position where it writes the label (the parsed label only when no such position exists). Unlike
the parsed 0/1/2, that is almost never tied; what ties remain are broken by first-stage rank.
Results are appended to a JSONL file query by query, so a long job resumes where it stopped. Each
line carries a fingerprint of what was judged (the rendered prompt format, the query, the top-k
docids and their text as the model saw it): a query is taken from the file only when that
fingerprint still matches, so a changed document, query, run or prompt is judged again.

fmt="explain" (InteRank): explanation, then `Relevance Label: <l> ##`. fmt="label" (its ablation):
the label line alone, so a few new tokens suffice.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .files import atomic_write, content_hash
from .generate import generate
from .prompts import LABEL_PREFIX, LABELS, MAX_DOC_CHARS, STOP, parse_label, prompt_hash, prompt_ids


@dataclass
class Judgement:
    docid: str
    label: int | None  # the label the completion states; None when it states none
    score: float  # expected label in [0, 2]; -1 when the completion has no label at all
    text: str  # explanation + label line, as generated


def label_token_ids(tok) -> list[int]:
    """Ids of the tokens "0", "1", "2" as they follow the label prefix in the model's vocabulary."""
    ids = [tok.encode(f"{LABEL_PREFIX} {label}", add_special_tokens=False)[-1] for label in LABELS]
    if [tok.decode([i]).strip() for i in ids] != [str(label) for label in LABELS]:
        raise ValueError(f"the tokenizer does not write the labels {LABELS} as single tokens: {ids}")
    return ids


def label_distribution(tokens: list[int], watched: list[list[float]], tok, label_ids: list[int]) -> list[float] | None:
    """P(label) for each of LABELS, renormalised over the label tokens, at the last step that wrote a
    label token right after the label prefix (None: the completion wrote no label line)."""
    for t in range(len(tokens) - 1, -1, -1):
        if tokens[t] in label_ids and tok.decode(tokens[:t]).rstrip().endswith(LABEL_PREFIX):
            p = [math.exp(lp) for lp in watched[t]]
            return [q / sum(p) for q in p]
    return None


def expected_label(tokens: list[int], watched: list[list[float]], tok, label_ids: list[int]) -> float | None:
    """Expected label under label_distribution (the reranker's score)."""
    p = label_distribution(tokens, watched, tok, label_ids)
    return None if p is None else sum(label * q for label, q in zip(LABELS, p))


def judge(model, tok, query: str, docs: list[tuple[str, str]], fmt: str = "explain", max_new_tokens: int = 1024,
          batch_size: int = 16, compile: bool = False) -> list[Judgement]:
    """Greedy judgement (explanation + label, or the label alone with fmt="label") of each
    (docid, text), continuous-batched through batch_size slots. Prompts come from prompts.prompt_ids,
    exactly as in training (chat template, pinned date, document cut)."""
    label_ids = label_token_ids(tok)
    prompts = [prompt_ids(tok, query, text, fmt) for _, text in docs]
    out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=[STOP],
                   tokenizer=tok, batch_size=batch_size, watch_ids=label_ids, compile=compile)
    result = []
    for (docid, _), tokens, watched, text in zip(docs, out.tokens, out.watched, out.texts):
        label = parse_label(text)
        score = expected_label(tokens, watched, tok, label_ids)
        if score is None:
            score = float(label) if label is not None else -1.0
        result.append(Judgement(docid, label, score, text))
    return result


def order(judgements: list[Judgement]) -> dict[str, float]:
    """Sorted by score, ties by first-stage rank (the input order); distinct run scores for trec_eval."""
    ranked = sorted(range(len(judgements)), key=lambda i: (-judgements[i].score, i))
    return {judgements[i].docid: float(len(ranked) - r) for r, i in enumerate(ranked)}


def top_docids(ranking: dict[str, float], k: int) -> list[str]:
    """The first k docids of a first-stage ranking (score desc, ties by docid: a stable order)."""
    return [d for d, _ in sorted(ranking.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def prompt_fingerprint(tok, fmt: str = "explain") -> str:
    """What every prompt shares, rendered: the instructions, label format, document cut and pinned date
    (prompts.prompt_hash) and a fixed pair through the model's chat template and tokenizer, so a new
    template, tokenizer or prompt wording gives a new fingerprint."""
    probe = prompt_ids(tok, "Is this a question?", "A document.", fmt)
    return content_hash([prompt_hash(fmt), probe])[:16]


def query_key(prompt_fp: str, query: str, docids: list[str], docs: dict[str, str]) -> str:
    """Fingerprint of one query's judgements: prompt format, query text, top-k docids in order and
    the text of each as the model reads it (cut to MAX_DOC_CHARS)."""
    return content_hash([prompt_fp, query, [[d, docs[d][:MAX_DOC_CHARS]] for d in docids]])[:16]


def _read_records(out_jsonl: Path) -> tuple[dict, list[tuple[str, str]], bool]:
    """({qid: (key, judgements)}, the good lines as (qid, line), whether the file needs rewriting)."""
    done, good, dirty = {}, [], False
    text = out_jsonl.read_text() if out_jsonl.exists() else ""
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
            done[rec["qid"]] = (rec.get("key"), [Judgement(**j) for j in rec["judgements"]])
            good.append((rec["qid"], line))
        except (json.JSONDecodeError, KeyError, TypeError):
            # a line cut short by a crash: drop it (so appends start on a clean line), judge again
            print(f"{out_jsonl}:{n}: incomplete record dropped; that query is judged again")
            dirty = True
    return done, good, dirty or bool(text and not text.endswith("\n"))


def rerank_run(model, tok, queries: dict[str, str], docs: dict[str, str], run: dict[str, dict[str, float]],
               out_jsonl: str | Path, top_k: int = 100, fmt: str = "explain",
               **judge_kwargs) -> dict[str, dict[str, float]]:
    """Rerank the top_k of every query in `run`; judgements go to out_jsonl (one line per query,
    flushed as each query finishes). A query already there is not judged again if its line was made
    from the same prompt format, query text and top-k documents (see query_key); otherwise it is
    judged again and its old line removed."""
    out_jsonl = Path(out_jsonl)
    missing_q = [q for q in run if q not in queries]
    if missing_q:
        raise ValueError(f"run has queries with no text: {missing_q[:5]}{' ...' if len(missing_q) > 5 else ''}")
    ranked = {qid: top_docids(run[qid], top_k) for qid in run}
    for qid, ids in ranked.items():
        absent = [d for d in ids if d not in docs]
        if absent:
            raise ValueError(f"query {qid}: documents not in the corpus: {absent[:5]}")
    fp = prompt_fingerprint(tok, fmt)
    keys = {qid: query_key(fp, queries[qid], ids, docs) for qid, ids in ranked.items()}

    done, good, dirty = _read_records(out_jsonl)
    stale = {q for q, (key, js) in done.items()
             if q in run and (key != keys[q] or [j.docid for j in js] != ranked[q])}
    if stale:
        print(f"{out_jsonl}: {len(stale)} queries were judged with other inputs (documents, query, top-k or "
              f"prompt); they are judged again")
    if dirty or stale:
        keep = [line for qid, line in good if qid not in stale]
        atomic_write(out_jsonl, "".join(line + "\n" for line in keep))
        done = {q: v for q, v in done.items() if q not in stale}
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(out_jsonl, "a") as f:
        for qid in tqdm([q for q in run if q not in done], desc="rerank", unit="query"):
            js = judge(model, tok, queries[qid], [(d, docs[d]) for d in ranked[qid]], fmt=fmt, **judge_kwargs)
            f.write(json.dumps({"qid": qid, "key": keys[qid], "judgements": [asdict(j) for j in js]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[qid] = (keys[qid], js)
    return {qid: order(js) for qid, (_, js) in done.items() if qid in run}
