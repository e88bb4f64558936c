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
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .files import DataError, atomic_write, content_hash, read_json
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


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading ids every prompt shares (at least one id left to each). The prompts are
    tokenised whole, and only then compared: a tokeniser that merges across the question/document
    boundary (the chat template's "Document:\n" + the text) just shortens the shared part, so the
    shared ids are exactly those of today's whole-prompt path."""
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != prompts[0][i]), n)
    return n


def label_prefix_ids(tok) -> list[int]:
    """The ids of LABEL_PREFIX as they precede a label, e.g. "Relevance Label:" before " 2"."""
    prefixes = {tuple(tok.encode(f"{LABEL_PREFIX} {label}", add_special_tokens=False)[:-1]) for label in LABELS}
    if len(prefixes) != 1:
        raise ValueError(f"the tokenizer writes {LABEL_PREFIX!r} differently before each label: {prefixes}")
    return list(prefixes.pop())


def judge(model, tok, query: str, docs: list[tuple[str, str]], fmt: str = "explain", max_new_tokens: int = 1024,
          batch_size: int = 16, compile: bool = False, max_prompt_len: int | None = None) -> list[Judgement]:
    """Greedy judgement (explanation + label, or the label alone with fmt="label") of each
    (docid, text), continuous-batched through batch_size slots. Prompts come from prompts.prompt_ids,
    exactly as in training (chat template, pinned date, document cut; max_prompt_len: each document
    cut further until its prompt fits, as SFT's --max-len cut its training prompts, unless the question
    alone is longer); the ids all of a query's prompts share (instructions + question) are prefilled once.

    fmt="label" needs no decoding: the label line's prefix is appended as forced tokens and the label
    distribution read at the one position that follows (max_new_tokens unused). Its label is the most
    likely of the three and its text the line with that label; the score is what greedy decoding gives
    whenever the model writes the prefix itself."""
    if not docs:
        return []
    label_ids = label_token_ids(tok)
    if max_prompt_len and len(prompt_ids(tok, query, "", fmt)) > max_prompt_len:
        max_prompt_len = None  # the question alone is longer (SFT dropped such examples): documents stay uncut
    prompts = [prompt_ids(tok, query, text, fmt, max_prompt_len) for _, text in docs]
    if fmt == "label":
        prompts = [p + label_prefix_ids(tok) for p in prompts]
        max_new_tokens = 1
    n = shared_prefix(prompts)
    out = generate(model, [p[n:] for p in prompts], prefix=prompts[0][:n], max_new_tokens=max_new_tokens,
                   temperature=0.0, stop_strings=[STOP], tokenizer=tok, batch_size=batch_size, watch_ids=label_ids,
                   compile=compile)
    result = []
    for (docid, _), tokens, watched, text in zip(docs, out.tokens, out.watched, out.texts):
        if fmt == "label":
            p = [math.exp(lp) for lp in watched[0]]
            label = LABELS[p.index(max(p))]
            score = sum(lab * q for lab, q in zip(LABELS, p)) / sum(p)
            result.append(Judgement(docid, label, score, f"{LABEL_PREFIX} {label}{STOP}"))
            continue
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


# ---- fusion with the first stage: a weak judge can scramble a good first stage; fusing keeps both

def parse_fuse(method: str) -> tuple[str, float]:
    """"none" | "rrf" | "linear:ALPHA" -> (kind, alpha); ValueError naming the method otherwise."""
    kind, _, alpha = method.partition(":")
    if kind in ("none", "rrf") and not alpha:
        return kind, 0.0
    if kind == "linear":
        try:
            a = float(alpha)
            if math.isfinite(a) and a >= 0:
                return kind, a
        except ValueError:
            pass
    raise ValueError(f"unknown fusion {method!r}: expected none, rrf or linear:ALPHA (ALPHA a number >= 0)")


RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009)


def fuse(first_stage: dict[str, dict[str, float]], judged: dict[str, list[Judgement]],
         method: str = "none") -> dict[str, dict[str, float]]:
    """Final scores of each judged query's candidates (the judged docids), distinct per query.

    none: the judge's score alone. rrf: 1/(60 + first-stage rank) + 1/(60 + judge rank).
    linear:ALPHA: the first-stage score min-max normalised over the candidates, + ALPHA x expected label.
    A judgement with no label (score -1) counts as the lowest label, 0. Ties go to the first-stage order."""
    kind, alpha = parse_fuse(method)
    out = {}
    for qid, js in judged.items():
        ranking = first_stage.get(qid, {})
        missing = [j.docid for j in js if j.docid not in ranking]
        if missing:
            raise ValueError(f"query {qid}: judged documents not in the first-stage run: {missing[:5]}")
        fs = top_docids({j.docid: ranking[j.docid] for j in js}, len(js))  # first-stage order
        fs_rank = {d: r for r, d in enumerate(fs, 1)}
        label = {j.docid: max(j.score, 0.0) for j in js}
        if kind == "none":
            score = label
        elif kind == "rrf":
            by_judge = sorted(fs, key=lambda d: (-label[d], fs_rank[d]))
            score = {d: 1 / (RRF_K + fs_rank[d]) + 1 / (RRF_K + r) for r, d in enumerate(by_judge, 1)}
        else:
            lo, hi = min(ranking[d] for d in fs), max(ranking[d] for d in fs)
            score = {d: (ranking[d] - lo) / (hi - lo) if hi > lo else 0.0 for d in fs}
            score = {d: s + alpha * label[d] for d, s in score.items()}
        final = sorted(fs, key=lambda d: (-score[d], fs_rank[d]))
        out[qid] = {d: float(len(final) - r) for r, d in enumerate(final)}
    return out


def bright_contamination(model_dir: str | Path, domain: str) -> str | None:
    """Why a model must not be evaluated on BRIGHT `domain`, from the provenance.json that training
    writes beside the weights; None when it may (or when there is no such file: not trained by us)."""
    path = Path(model_dir) / "provenance.json"
    if not path.is_file():
        return None
    prov = read_json(path, "a model's provenance (a JSON object)")
    checks = prov.get("bright")
    if not (isinstance(checks, dict) and isinstance(checks.get("checked"), bool)
            and isinstance(checks.get("overlap") or {}, dict)):
        raise DataError(f"{path}: field 'bright' must be an object with 'checked' (true or false) and "
                        f"'overlap' ({{domain: count}}), got {str(checks)[:80]}")
    overlap = checks.get("overlap") or {}
    if overlap.get(domain, 0) > 0:
        seen = ", ".join(f"{d} {n}" for d, n in sorted(overlap.items()) if n)
        return (f"model {model_dir} was trained on data that overlaps BRIGHT {domain}: {overlap[domain]} records "
                f"(all overlaps: {seen}; {path.name})")
    if not checks["checked"] and prov.get("exclude_bright") is not True:
        return (f"model {model_dir} was trained on data never checked against BRIGHT and not built with "
                f"--exclude-bright ({path.name}): it may contain BRIGHT {domain}")
    return None


def prompt_fingerprint(tok, fmt: str = "explain", max_prompt_len: int | None = None) -> str:
    """What every prompt shares, rendered: the instructions, label format, document cut and pinned date
    (prompts.prompt_hash) and a fixed pair through the model's chat template and tokenizer, so a new
    template, tokenizer or prompt wording gives a new fingerprint; and the prompt length cap, if any."""
    probe = prompt_ids(tok, "Is this a question?", "A document.", fmt)
    return content_hash([prompt_hash(fmt), probe] + ([max_prompt_len] if max_prompt_len else []))[:16]


def query_key(prompt_fp: str, query: str, docids: list[str], docs: dict[str, str]) -> str:
    """Fingerprint of one query's judgements: prompt format, query text, top-k docids in order and
    the text of each as the model reads it (cut to MAX_DOC_CHARS)."""
    return content_hash([prompt_fp, query, [[d, docs[d][:MAX_DOC_CHARS]] for d in docids]])[:16]


def _rank_file(out_jsonl: Path, rank: int) -> Path:
    return out_jsonl.with_name(f"{out_jsonl.stem}.rank{rank}{out_jsonl.suffix}")


def _rank_files(out_jsonl: Path) -> list[Path]:
    """out_jsonl, then the files of a sharded run's ranks beside it (those that exist)."""
    name = re.compile(re.escape(out_jsonl.stem) + r"\.rank(\d+)" + re.escape(out_jsonl.suffix))
    ranks = {int(m[1]): p for p in out_jsonl.parent.glob("*") if (m := name.fullmatch(p.name))}
    return [out_jsonl] + [ranks[r] for r in sorted(ranks)]


def read_judgements(out_jsonl: str | Path) -> dict[str, list[Judgement]]:
    """A rerank job's judgements by query: out_jsonl and, while a sharded run is unfinished, its
    ranks' files beside it (out_jsonl itself wins where a query is in both). Cut lines are skipped."""
    judged = {}
    for path in _rank_files(Path(out_jsonl)):
        for qid, (_, js) in _read_records(path, quiet=True)[0].items():
            judged.setdefault(qid, js)
    return judged


def _read_records(out_jsonl: Path, quiet: bool = False) -> tuple[dict, list[tuple[str, str]], bool]:
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
            if not quiet:
                print(f"{out_jsonl}:{n}: incomplete record dropped; that query is judged again")
            dirty = True
    return done, good, dirty or bool(text and not text.endswith("\n"))


def _fold_ranks(out_jsonl: Path, current) -> None:
    """Merge a sharded run's rank files into out_jsonl (a record judged from today's inputs wins
    over a stale one), then delete them: one process continues what any number of ranks began."""
    paths = _rank_files(out_jsonl)
    if len(paths) == 1:
        return
    lines = {}  # qid -> (is current, line), in first-seen order
    for path in paths:
        done, good, _ = _read_records(path, quiet=path != out_jsonl)
        for qid, line in good:
            now = current(qid, *done[qid])
            if qid not in lines or (now and not lines[qid][0]):
                lines[qid] = (now, line)
    atomic_write(out_jsonl, "".join(line + "\n" for _, line in lines.values()))
    for path in paths[1:]:
        path.unlink()


def rerank_run(model, tok, queries: dict[str, str], docs: dict[str, str], run: dict[str, dict[str, float]],
               out_jsonl: str | Path, top_k: int = 100, fmt: str = "explain", rank: int = 0, world_size: int = 1,
               max_prompt_len: int | None = None, **judge_kwargs) -> dict[str, dict[str, float]]:
    """Rerank the top_k of every query in `run`; judgements go to out_jsonl (one line per query,
    flushed as each finishes). A query already there is not judged again if its line was made from
    the same prompt format, query text and top-k documents (see query_key); otherwise it is judged
    again and its old line removed. Returns {qid: order(judgements)} of every query judged so far.

    Sharded (world_size > 1, e.g. under torchrun): rank r judges the r-th of every world_size queries
    that no rank's file holds yet, appending to its own out_jsonl.rank{r}; afterwards one process
    (world_size 1) folds the rank files into out_jsonl, whatever number of ranks wrote them."""
    out_jsonl = Path(out_jsonl)
    missing_q = [q for q in run if q not in queries]
    if missing_q:
        raise ValueError(f"run has queries with no text: {missing_q[:5]}{' ...' if len(missing_q) > 5 else ''}")
    ranked = {qid: top_docids(run[qid], top_k) for qid in run}
    for qid, ids in ranked.items():
        absent = [d for d in ids if d not in docs]
        if absent:
            raise ValueError(f"query {qid}: documents not in the corpus: {absent[:5]}")
    fp = prompt_fingerprint(tok, fmt, max_prompt_len)
    keys = {qid: query_key(fp, queries[qid], ids, docs) for qid, ids in ranked.items()}
    current = lambda q, key, js: q in run and key == keys[q] and [j.docid for j in js] == ranked[q]

    if world_size == 1:
        _fold_ranks(out_jsonl, current)
    mine = out_jsonl if world_size == 1 else _rank_file(out_jsonl, rank)
    done = {}  # what the other files hold (read only: their ranks may be appending right now)
    for path in _rank_files(out_jsonl):
        if path != mine:
            done.update((q, js) for q, (key, js) in _read_records(path, quiet=True)[0].items()
                        if current(q, key, js) and q not in done)
    own, good, dirty = _read_records(mine)
    stale = {q for q, (key, js) in own.items() if q in run and not current(q, key, js)}
    if stale:
        print(f"{mine}: {len(stale)} queries were judged with other inputs (documents, query, top-k or "
              f"prompt); they are judged again")
    if dirty or stale:
        atomic_write(mine, "".join(line + "\n" for qid, line in good if qid not in stale))
    done.update((q, js) for q, (_, js) in own.items() if q in run and q not in stale)
    todo = [q for i, q in enumerate(run) if i % world_size == rank and q not in done]
    mine.parent.mkdir(parents=True, exist_ok=True)
    with open(mine, "a") as f:
        for qid in tqdm(todo, desc="rerank" if world_size == 1 else f"rerank rank {rank}", unit="query"):
            js = judge(model, tok, queries[qid], [(d, docs[d]) for d in ranked[qid]], fmt=fmt,
                       max_prompt_len=max_prompt_len, **judge_kwargs)
            f.write(json.dumps({"qid": qid, "key": keys[qid], "judgements": [asdict(j) for j in js]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[qid] = js
    return {qid: order(js) for qid, js in done.items()}
