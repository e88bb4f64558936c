"""StackExchange data dumps: stream `Posts.xml` (any size, constant memory) into questions with their
answers, and turn post HTML into plain text.

A dump's Posts.xml is one `<posts>` element holding one `<row .../>` per post, every field an
attribute: `PostTypeId` 1 = question (Title, Body, Tags like `<a><b>`, Score, AcceptedAnswerId),
2 = answer (ParentId, Body, Score). Bodies are HTML, escaped once more as XML attribute text. Rows are
in Id order in the official dumps (an answer after its question), but nothing here relies on it: an
answer that comes first waits in a buffer, and a second pass collects them if there are too many. The
file is an `iterparse` stream whose rows are cleared as soon as they are read; what stays in memory is
the kept questions (bounded by `max_questions`) with their answers, and one bit per question id.
"""

import gzip
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path


class DumpError(ValueError):
    """The file is not a readable StackExchange Posts.xml."""


@dataclass
class Answer:
    id: str
    score: int
    text: str
    links: list[str]  # absolute http(s) hrefs of the body's <a> tags, in order


@dataclass
class Question:
    id: str
    title: str
    body: str  # plain text
    tags: list[str]
    score: int
    accepted_id: str | None
    answers: list[Answer] = field(default_factory=list)

    @property
    def query(self) -> str:
        # METHOD.md §1: the query is title + " " + body
        return f"{self.title} {self.body}".strip()

    def ordered_answers(self) -> list[Answer]:
        """Accepted answer first, then by score (ties: dump order)."""
        return sorted(self.answers, key=lambda a: (a.id != self.accepted_id, -a.score))

    def links(self) -> list[str]:
        """Distinct links of the answers, accepted answer's first."""
        seen, out = set(), []
        for a in self.ordered_answers():
            for u in a.links:
                if u not in seen:
                    seen.add(u)
                    out.append(u)
        return out


# ----------------------------------------------------------------------------------------------
# Post HTML -> text. Bodies are small, well-formed-ish fragments (p, pre/code, lists, blockquote, a,
# img): keep the text, put block elements on their own lines, keep code line breaks.

_BLOCK = {"p", "div", "pre", "blockquote", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "br",
          "hr", "table", "tr", "dl", "dt", "dd"}


class _PostText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.links, self.pre = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre += 1
        if tag == "a":
            href = dict(attrs).get("href") or ""
            if href.startswith(("http://", "https://")):
                self.links.append(href.strip())

    def handle_endtag(self, tag):
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def post_text(html: str) -> tuple[str, list[str]]:
    """(plain text, absolute http(s) links) of a post body."""
    p = _PostText()
    p.feed(html or "")
    p.close()
    text = "".join(p.parts)
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text, p.links


# ----------------------------------------------------------------------------------------------
# Streaming


def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic == b"7z\xbc\xaf\x27\x1c":
        raise DumpError(f"{path}: a .7z archive; extract Posts.xml from it first (7z x {path.name} Posts.xml)")
    return open(path, "rb")


def iter_rows(path: str | Path):
    """Yield the attribute dict of every `<row>` of a Posts.xml (.xml or .xml.gz), in file order."""
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"{path}: no such file")
    n = 0
    with _open(path) as f:
        it = ET.iterparse(f, events=("start", "end"))
        try:
            _, root = next(it)
            if root.tag != "posts":
                raise DumpError(f"{path}: not a StackExchange Posts.xml (root element <{root.tag}>, expected <posts>)")
            for event, elem in it:
                if event != "end" or elem.tag != "row":
                    continue
                n += 1
                a = dict(elem.attrib)
                # drop the row (and everything read before it) so memory stays flat on a 90 GB file
                elem.clear()
                root.clear()
                if "Id" not in a or "PostTypeId" not in a:
                    raise DumpError(f"{path}: row {n} has no Id/PostTypeId attribute: not a Posts.xml row")
                yield a
        except ET.ParseError as e:
            raise DumpError(f"{path}: not a StackExchange Posts.xml ({e})") from None
        except (OSError, EOFError) as e:  # truncated or corrupt gzip
            raise DumpError(f"{path}: unreadable ({e})") from None


def _int(v, default=0):
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def parse_tags(s: str | None) -> list[str]:
    # "<storage><whole-bean>" (older dumps) or "|storage|whole-bean|" (2024+ dumps)
    return [t for t in re.split(r"[<>|]+", s or "") if t]


@dataclass
class ReadStats:
    rows: int = 0
    questions: int = 0
    answers: int = 0
    filtered: int = 0  # questions dropped by score/accepted/tags
    excluded: int = 0  # questions dropped by `exclude` (BRIGHT overlap)
    excluded_documents: int = 0  # pairs dropped because the document is a BRIGHT gold answer
    kept: int = 0
    answers_kept: int = 0
    links: int = 0     # links in the kept questions' answers (with repeats)


class _IdSet:
    """Ids seen so far: a bitmap for integer ids (10 MB covers 80M posts), a set for anything else."""

    def __init__(self):
        self.bits, self.other = bytearray(), set()

    def add(self, i: str):
        n = int(i) if i.isascii() and i.isdigit() else -1  # ('²'.isdigit() is True, int('²') fails)
        if n < 0:
            self.other.add(i)
            return
        if (n >> 3) >= len(self.bits):
            self.bits.extend(bytes(max((n >> 3) + 1 - len(self.bits), len(self.bits))))
        self.bits[n >> 3] |= 1 << (n & 7)

    def __contains__(self, i) -> bool:
        if not i or not (i.isascii() and i.isdigit()):
            return i in self.other
        n = int(i)
        return (n >> 3) < len(self.bits) and bool(self.bits[n >> 3] & (1 << (n & 7)))


def read_questions(path, min_score=None, require_accepted=False, tags=None, max_questions=None,
                   exclude=None, progress=False, early_cap=1_000_000) -> tuple[list[Question], ReadStats]:
    """Questions of a dump that pass the filters, in file order, each with its answers.

    min_score: keep questions with Score >= min_score. require_accepted: keep only questions with an
    accepted answer. tags: keep questions carrying any of these tags. exclude: a callable
    (title, body) -> bool dropping a question (counted in stats.excluded). max_questions: keep the
    first this many questions that pass (the file is still read to the end for their answers).

    One pass in the usual case: an answer whose question was already read is kept or dropped at once;
    one whose question has not been read yet waits in a buffer (official dumps are in Id order, so it
    stays empty). Only when more than `early_cap` answers wait is the buffer dropped for a second pass.
    """
    st = ReadStats()
    tags = set(tags or ())
    kept: dict[str, Question] = {}
    seen = _IdSet()   # every question id read so far, kept or not
    early = []        # (parent id, answer row) of answers read before their question
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="posts", unit=" rows", unit_scale=True)

    def attach(q, a):
        text, links = post_text(a.get("Body"))
        q.answers.append(Answer(a["Id"], _int(a.get("Score")), text, links))
        st.answers_kept += 1
        st.links += len(links)

    for a in iter_rows(path):
        st.rows += 1
        if bar is not None and st.rows % 10_000 == 0:
            bar.update(10_000)
        if a["PostTypeId"] == "2":
            st.answers += 1
            parent = a.get("ParentId") or ""
            q = kept.get(parent)
            if q is not None:
                attach(q, a)
            elif early is not None and parent not in seen:
                early.append((parent, {k: a.get(k) for k in ("Id", "Score", "Body")}))
                if len(early) > early_cap:
                    early = None  # too many to hold: collect them with a second pass instead
            continue
        if a["PostTypeId"] != "1":
            continue
        st.questions += 1
        seen.add(a["Id"])
        if max_questions is not None and len(kept) >= max_questions:
            continue  # keep reading: answers of kept questions may come later, and the counts
        qtags = parse_tags(a.get("Tags"))
        score = _int(a.get("Score"))
        accepted = a.get("AcceptedAnswerId")
        if ((min_score is not None and score < min_score) or (require_accepted and not accepted)
                or (tags and not tags.intersection(qtags))):
            st.filtered += 1
            continue
        title = re.sub(r"\s+", " ", a.get("Title") or "").strip()
        body, _ = post_text(a.get("Body"))
        if exclude is not None and exclude(title, body):
            st.excluded += 1
            continue
        kept[a["Id"]] = Question(a["Id"], title, body, qtags, score, accepted)
    if bar is not None:
        bar.update(st.rows % 10_000)
        bar.close()
    if early is not None:
        for parent, a in early:
            if parent in kept:
                attach(kept[parent], a)
    elif kept:  # second pass for the answers that came before their question
        have = {x.id for q in kept.values() for x in q.answers}
        for a in iter_rows(path):
            if a["PostTypeId"] == "2" and a["Id"] not in have:
                q = kept.get(a.get("ParentId"))
                if q is not None:
                    attach(q, a)
    st.kept = len(kept)
    return list(kept.values()), st


# ----------------------------------------------------------------------------------------------
# A site as a retrieval benchmark (the recipe's held-out evaluation).


def eval_task(path) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(queries, documents, qrels) of one dump, built from the threads alone:
    queries  = questions with an accepted answer and at least 2 answers (text: title + body);
    documents = every non-empty answer of the site (id "answer:<post id>", as `train.py data` names them);
    qrels    = the accepted answer 2, the question's other answers 1 (every other document 0).
    A first stage then ranks all the site's answers for each query (minirank.bm25)."""
    questions, _ = read_questions(path)
    docs = {f"answer:{a.id}": a.text for q in questions for a in q.answers if a.text.strip()}
    queries, qrels = {}, {}
    for q in questions:
        own = [a for a in q.answers if f"answer:{a.id}" in docs]
        if q.accepted_id and len(own) >= 2 and any(a.id == q.accepted_id for a in own):
            queries[q.id] = q.query
            qrels[q.id] = {f"answer:{a.id}": 2 if a.id == q.accepted_id else 1 for a in own}
    return queries, docs, qrels
