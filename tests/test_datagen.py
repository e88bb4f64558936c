"""Teacher-data pipeline: the real coffee dump, HTML extraction, and an end-to-end run over real HTTP on
127.0.0.1 (page hosts with redirects, 404s, oversize/binary pages, robots.txt, a slow host; a teacher
server injecting 429/500/slow/dropped/malformed answers), killed with SIGKILL half-way and resumed."""

import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minirank import datagen, prompts
from minirank.crawl import html_text
from minirank.bright import BrightFilter, BrightError
from minirank.stackexchange import DumpError, iter_rows, read_questions
from minirank.teacher import StructureTeacher

ROOT = Path(__file__).resolve().parent.parent
COFFEE = ROOT.parent / "shared" / "stackexchange" / "coffee" / "Posts.xml"
BRIGHT = ROOT.parent / "shared" / "bright"
FIX = Path(__file__).parent / "fixtures" / "datagen"


# ----------------------------------------------------------------------------------------------
# a Posts.xml exactly as the dumps write it


def _attr(v: str) -> str:
    return (v.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("\n", "&#xA;"))


def write_posts(path: Path, rows: list[dict]):
    lines = ['\ufeff<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for r in rows:
        lines.append("  <row " + " ".join(f'{k}="{_attr(str(v))}"' for k, v in r.items()) + " />")
    lines.append("</posts>")
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")


def question(i, title, body, accepted=None, score=3, tags="<brewing>"):
    r = {"Id": i, "PostTypeId": 1}
    if accepted:
        r["AcceptedAnswerId"] = accepted
    r.update({"CreationDate": "2015-01-27T20:09:32.720", "Score": score, "ViewCount": 10, "Body": body,
              "OwnerUserId": 4, "LastActivityDate": "2015-03-05T19:51:01.263", "Title": title, "Tags": tags,
              "AnswerCount": 1, "CommentCount": 0})
    return r


def answer(i, parent, body, score=1):
    return {"Id": i, "PostTypeId": 2, "ParentId": parent, "CreationDate": "2015-01-27T20:19:32.720",
            "Score": score, "Body": body, "OwnerUserId": 5, "LastActivityDate": "2015-01-27T20:19:32.720",
            "CommentCount": 0}


# ----------------------------------------------------------------------------------------------
# the real dump


@pytest.mark.skipif(not COFFEE.is_file(), reason="shared coffee dump absent")
def test_coffee_dump_counts_and_links():
    qs, st = read_questions(COFFEE)
    assert (st.questions, st.answers, st.kept, st.answers_kept) == (225, 327, 225, 327)
    assert sum(q.accepted_id is not None for q in qs) == 105
    assert st.links == sum(len(a.links) for q in qs for a in q.answers) == 463
    # cross-check the links against a plain scan of the raw attribute text
    import re
    raw = [r["Body"] for r in iter_rows(COFFEE) if r["PostTypeId"] == "2"]
    assert sum(len(re.findall(r'<a [^>]*href="https?://', b)) for b in raw) == 463
    q1 = next(q for q in qs if q.id == "1")
    assert q1.query.startswith("How should I store whole bean coffee? I just got a pound of microroasted")
    assert q1.tags == ["storage", "whole-bean"] and q1.ordered_answers()[0].id == "24"
    # filters
    qs2, st2 = read_questions(COFFEE, require_accepted=True, min_score=5, max_questions=10)
    assert st2.kept == 10 and all(q.accepted_id and q.score >= 5 for q in qs2)


def test_answers_before_questions_and_html(tmp_path):
    p = tmp_path / "Posts.xml"
    write_posts(p, [answer(5, 2, '<p>See <a href="http://x.org/a?b=1&amp;c=2">this</a> &amp; '
                                 '<a href="/rel">that</a></p>\n<pre><code>a = 1\nb = 2\n</code></pre>'),
                    question(2, "Grind  size?", "<p>How fine &lt;exactly&gt;?</p>\n", accepted=5),
                    answer(6, 2, "<p>Second</p>", score=9), answer(7, 99, "<p>orphan</p>")])
    qs, st = read_questions(p)
    assert st.questions == 1 and st.answers == 3 and st.answers_kept == 2
    q = qs[0]
    assert q.query == "Grind size? How fine <exactly>?"
    assert [a.id for a in q.ordered_answers()] == ["5", "6"]  # accepted first despite lower score
    assert q.links() == ["http://x.org/a?b=1&c=2"]
    assert "a = 1\nb = 2" in q.ordered_answers()[0].text
    gz = tmp_path / "Posts.xml.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert read_questions(gz)[0][0].query == q.query
    # more early answers than the buffer holds: a second pass finds them, nothing twice
    qs2, st2 = read_questions(p, early_cap=0)
    assert [a.id for a in qs2[0].ordered_answers()] == ["5", "6"] and st2.answers_kept == 2


def test_not_a_posts_file(tmp_path, capsys):
    bad = tmp_path / "Users.xml"
    bad.write_text('<?xml version="1.0"?>\n<users>\n  <row Id="1" />\n</users>\n')
    with pytest.raises(DumpError, match="not a StackExchange Posts.xml"):
        read_questions(bad)
    junk = tmp_path / "junk.xml"
    junk.write_bytes(b"\x00\x01 binary")
    with pytest.raises(DumpError, match="not a StackExchange Posts.xml"):
        read_questions(junk)
    # through the CLI entry point: one line, exit 2
    capsys.readouterr()
    assert datagen.main(["--posts", str(bad), "--out", str(tmp_path / "o"), "--teacher-url", "http://127.0.0.1:9",
                         "--teacher-model", "m", "--documents", "answers", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py data: error: ") and "not a StackExchange Posts.xml" in err and err.count("\n") == 1
    cut = tmp_path / "cut.xml.gz"  # a download that stopped half-way
    full = gzip.compress(("<posts>\n" + '  <row Id="1" PostTypeId="1" Title="t" Body="b" />\n' * 5000).encode())
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(DumpError, match="cut.xml.gz"):
        read_questions(cut)
    seven = tmp_path / "Posts.7z"
    seven.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\x00" * 20)
    with pytest.raises(DumpError, match="extract Posts.xml"):
        read_questions(seven)


def test_odd_ids_and_foreign_cache_files(tmp_path):
    """Hostile or foreign input is read around, never a traceback: a non-ASCII digit id in the dump,
    page-cache files of another layout (a miss: fetched again)."""
    p = tmp_path / "Posts.xml"
    write_posts(p, [question("\u00b2", "Odd id", "<p>b</p>"), answer(9, "\u00b2", "<p>a</p>"), question(3, "T", "<p>c</p>")])
    qs, st = read_questions(p)
    assert [q.id for q in qs] == ["\u00b2", "3"] and [a.id for a in qs[0].answers] == ["9"]
    from minirank.crawl import PageCache
    cache, url = PageCache(tmp_path / "pages"), "http://example.org/x"
    for junk in ([1, 2], {"url": url, "status": "ok", "from_another_version": 1}):
        cache.path(url).parent.mkdir(parents=True, exist_ok=True)
        cache.path(url).write_text(json.dumps(junk))
        assert cache.get(url) is None


@pytest.mark.skipif(not (BRIGHT / "examples").is_dir(), reason="shared BRIGHT examples absent")
def test_exclude_bright(tmp_path):
    row = json.loads(gzip.open(BRIGHT / "examples" / "biology.jsonl.gz", "rt").readline())
    title, body = row["query"].split("\n", 1)
    f = BrightFilter(BRIGHT)
    assert f(title, "unrelated body") and f("Another title entirely here", body)
    assert not f("How should I store whole bean coffee?", "I just got a pound of microroasted coffee.")
    p = tmp_path / "Posts.xml"
    html_body = "<p>" + body.replace("\n", "</p>\n<p>") + "</p>"
    write_posts(p, [question(1, "A rephrased title, same body", html_body), question(2, "Coffee?", "<p>Beans?</p>")])
    qs, st = read_questions(p, exclude=f)
    assert st.excluded == 1 and [q.id for q in qs] == ["2"]


def test_exclude_bright_bad_examples(tmp_path, capsys):
    """A broken BRIGHT examples file is one line naming file and line, exit 2."""
    (tmp_path / "b" / "examples").mkdir(parents=True)
    (tmp_path / "b" / "examples" / "x.jsonl").write_text('{"query": "a b c"}\nnot json\n')
    posts = tmp_path / "Posts.xml"
    write_posts(posts, [question(1, "Espresso", "<p>crema?</p>", accepted=2), answer(2, 1, "<p>tips</p>")])
    capsys.readouterr()
    assert datagen.main(["--posts", str(posts), "--out", str(tmp_path / "o"), "--documents", "answers",
                         "--teacher", "structure", "--exclude-bright", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "x.jsonl:2: not a JSON object" in err and err.count("\n") == 1
    (tmp_path / "b" / "examples" / "x.jsonl").write_text('{"id": "1"}\n')
    with pytest.raises(BrightError, match=r"x.jsonl: row 1: not a BRIGHT example"):
        BrightFilter(tmp_path / "b")


def test_html_main_text():
    page = (FIX / "article.html").read_text()
    text = html_text(page)
    assert text.startswith("Cold brew ratio guide\n")  # <title> = <h1>: said once
    assert text.count("Cold brew ratio guide") == 1
    for keep in ("Use one part coffee to eight parts water for a concentrate you dilute later. Grind coarse", "steep for 12 to 18 hours", "ratio = 1 / 8"):
        assert keep in text
    for drop in ("Home", "Subscribe to our newsletter", "var tracker", "Accept cookies", "Related posts",
                 "color: red", "Copyright"):
        assert drop not in text


@pytest.mark.parametrize("name", ["article", "blog", "docs", "oldschool", "wiki"])
def test_html_fixture_pages(name):
    """Every line of the hand-written main text is extracted whole; little else comes with it."""
    got = html_text((FIX / f"{name}.html").read_text())
    gold = (FIX / f"{name}.txt").read_text().strip().splitlines()
    lines = got.splitlines()
    assert all(g in lines for g in gold), (gold, lines)
    extra = sum(len(ln) for ln in lines if ln not in gold)
    assert extra <= 0.15 * sum(len(g) for g in gold), [ln for ln in lines if ln not in gold]


# ----------------------------------------------------------------------------------------------
# end to end over real HTTP


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a thread; `routes(handler) -> bool` answers a request."""

    def __init__(self, routes):
        log = self.log = []
        times = self.times = []  # arrival time of each request in `log`
        lock = threading.Lock()

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else every answer waits ~40 ms for a delayed ACK

            def log_message(self, *a):
                pass

            def _go(self):
                with lock:
                    log.append((self.command, self.path, dict(self.headers)))
                    times.append(time.monotonic())
                routes(self)

            do_GET = do_POST = _go

            def send(self, code, body=b"", ctype="text/html; charset=utf-8", headers=()):
                body = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients hanging up (size cap, timeouts, the SIGKILL) are part of the test

        self.httpd = Quiet(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def paths(self):
        return [p for _, p, _ in self.log]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _page(title, words):
    return (f"<html><head><title>{title}</title><style>p {{color: red}}</style></head><body>"
            f"<nav><a href='/'>Home</a> <a href='/x'>About</a></nav>"
            f"<main><h1>{title}</h1><p>{words}</p></main><footer>Copyright 2015</footer></body></html>")


def host_a(h):  # main page host: robots.txt forbids /private/
    p = h.path
    if p == "/robots.txt":
        return h.send(200, "User-agent: *\nDisallow: /private/\n", "text/plain")
    if p.startswith("/ok"):
        n = p[3:].split(".")[0]
        return h.send(200, _page(f"Espresso page {n}", f"espresso grind pressure extraction crema number {n}"))
    if p == "/plain.txt":
        return h.send(200, "Water hardness matters for coffee extraction and scale.", "text/plain")
    if p == "/missing":
        return h.send(404, "nope")
    if p == "/big.html":  # over the 50 kB cap, no Content-Length: must be cut while streaming
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"<p>" + b"big " * 4000 + b"</p>"
        try:
            for _ in range(100):
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        return
    if p == "/file.pdf":
        return h.send(200, b"%PDF-1.4\x00\x01\x02" * 100, "application/pdf")
    if p == "/to-private":
        return h.send(302, "", headers=[("Location", "/private/secret.html")])
    if p.startswith("/loop"):
        n = int(p[5:] or 0)
        return h.send(301, "", headers=[("Location", f"/loop{n + 1}")])
    if p == "/flaky":  # 503 with Retry-After once, then fine
        if sum(1 for _, q, _ in SERVERS["a"].log if q == "/flaky") == 1:
            return h.send(503, "busy", headers=[("Retry-After", "0")])
        return h.send(200, _page("Flaky but fine", "moka pot stovetop pressure brewing"))
    if p.startswith("/private/"):
        return h.send(200, _page("Secret", "must never be fetched"))
    return h.send(404, "")


def host_b(h):  # no robots.txt (404: everything allowed); target of a cross-host redirect
    if h.path.startswith("/go-b"):
        return h.send(302, "", headers=[("Location", SERVERS["b"].url + "/doc.html")])
    if h.path == "/doc.html":
        return h.send(200, _page("French press guide", "french press coarse grind steep four minutes plunger"))
    return h.send(404, "")


def host_slow(h):  # answers its robots.txt, then every page too slowly
    if h.path == "/robots.txt":
        return h.send(200, "User-agent: *\nAllow: /\n", "text/plain")
    time.sleep(2.5)
    try:
        h.send(200, _page("Slow", "slow page"))
    except OSError:
        pass


SERVERS = {}
GOOD = "Relevance Label: {label}"


def teacher_routes(h):
    if h.command == "GET" and h.path == "/v1/models":
        return h.send(200, json.dumps({"object": "list", "data": [{"id": "judge-70b", "object": "model"}]}),
                      "application/json")
    if h.headers.get("Authorization") != "Bearer sk-test-SECRET-42":  # echoes the key, as some servers do
        return h.send(401, json.dumps({"error": {"message": f"invalid api key {h.headers.get('Authorization')}"}}),
                      "application/json")
    n = int(h.headers["Content-Length"])
    req = json.loads(h.rfile.read(n))
    if req["model"] != "judge-70b":
        return h.send(404, json.dumps({"error": {"message": f"model {req['model']} does not exist"}}), "application/json")
    assert req["temperature"] == 0 and req["stop"] == [prompts.STOP]
    content = req["messages"][-1]["content"]
    key = hashlib.sha1(content.encode()).hexdigest()
    with TEACHER_LOCK:
        TEACHER_SEEN[key] = k = TEACHER_SEEN.get(key, 0) + 1
        TEACHER_TIMES.setdefault(key, []).append((time.monotonic(), int(key, 16) % 7))
    doc = content.split("Document:\n", 1)[1]
    label = 2 if "espresso" in doc else 1 if "press" in doc or "moka" in doc else 0
    kind = int(key, 16) % 7  # 0-4: the first attempt fails in one of five ways; 5, 6: slow answers
    if "never-parseable" in content:
        kind = "never"
    if "always-broken" in content:
        kind = "broken"
    if kind == 0 and k == 1:
        return h.send(429, json.dumps({"error": {"message": "slow down"}}), "application/json",
                      headers=[("Retry-After", "0.2")])
    if (kind == 1 and k == 1) or kind == "broken":
        return h.send(500, "internal error", "text/plain")
    if kind == 2 and k == 1:  # drop the connection without an answer
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
        return
    if kind == 3 and k == 1:
        return h.send(200, "{not json", "application/json")
    text = f"The document is about the topic.\n\n{GOOD.format(label=label)}"
    if (kind == 4 and k == 1) or kind == "never":
        text = "I think it is somewhat related, hard to say."
    time.sleep(0.3 if kind in (5, 6) else 0.05)
    body = {"id": "x", "object": "chat.completion", "model": req["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(content) // 4, "completion_tokens": 12, "total_tokens": len(content) // 4 + 12}}
    return h.send(200, json.dumps(body), "application/json")


TEACHER_LOCK = threading.Lock()
TEACHER_SEEN = {}
TEACHER_TIMES = {}


@pytest.fixture
def servers():
    SERVERS.clear()
    TEACHER_SEEN.clear()
    TEACHER_TIMES.clear()
    SERVERS.update(a=_Server(host_a), b=_Server(host_b), slow=_Server(host_slow), teacher=_Server(teacher_routes))
    yield SERVERS
    for s in SERVERS.values():
        s.close()


def _e2e_posts(path: Path, S):
    a, b, slow = S["a"].url, S["b"].url, S["slow"].url
    link = lambda u, t="link": f'<a href="{u}" rel="nofollow">{t}</a>'  # noqa: E731
    rows, aid = [], 1000
    links = [
        [f"{a}/ok1.html", f"{a}/missing", f"{b}/go-b1"],
        [f"{a}/ok2.html", f"{a}/private/secret.html", f"{a}/big.html"],
        [f"{a}/ok3.html", f"{a}/file.pdf", f"{a}/to-private"],
        [f"{a}/ok4.html", f"{a}/loop0", f"{slow}/page.html"],
        [f"{a}/ok5.html", f"{a}/plain.txt", f"{a}/flaky"],
        [f"{a}/ok6.html", f"{a}/ok1.html#usage", "http:///no-host"],
    ] + [[f"{a}/ok{i}.html"] for i in range(7, 15)]
    topics = ["espresso crema", "french press grind", "water hardness", "moka pot", "cold brew", "pour over"]
    for qi, ls in enumerate(links):
        qid = qi + 1
        acc = aid + 1
        title = f"Question {qid} about {topics[qi % len(topics)]} brewing"
        body = f"<p>How do I get better {topics[qi % len(topics)]}?</p>\n"
        if qi == 2:
            body += "<p>never-parseable</p>\n"
        if qi == 3:
            body += "<p>always-broken</p>\n"
        rows.append(question(qid, title, body, accepted=acc))
        rows.append(answer(acc, qid, "<p>Read " + " and ".join(link(u) for u in ls[:2]) + ".</p>\n", score=2))
        if ls[2:]:
            rows.append(answer(acc + 1, qid, f"<p>Also {link(ls[2])}</p>\n", score=5))
        aid += 10
    rows.append(question(99, "Low score question", "<p>ignored</p>", score=-3))
    write_posts(path, rows)
    return links


def _cmd(posts, out, S, *extra):
    return [sys.executable, "train.py", "data", "--posts", str(posts), "--out", str(out),
            "--teacher-url", S["teacher"].url + "/v1", "--teacher-model", "judge-70b", "--api-key-env", "TEACHER_KEY",
            "--min-score", "0", "--inflight", "4", "--teacher-retries", "2", "--parse-retries", "1", "--teacher-backoff", "0.1",
            "--host-delay", "0.05", "--fetch-timeout", "1.0", "--fetch-retries", "1", "--max-page-bytes", "50000",
            "--max-redirects", "3", "--val-fraction", "0.3", "--quiet", *extra]


def _env():
    env = dict(os.environ, TEACHER_KEY="sk-test-SECRET-42", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("OPENAI_API_KEY", None)
    return env


def test_end_to_end_kill_and_resume(tmp_path, servers, monkeypatch, capsys):
    S = servers
    posts, out = tmp_path / "Posts.xml", tmp_path / "run"
    _e2e_posts(posts, S)
    cmd = _cmd(posts, out, S)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pairs = out / "pairs.jsonl"
    t0 = time.time()
    while time.time() - t0 < 60:
        if pairs.exists() and pairs.read_bytes().count(b"\n") >= 4:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.communicate()}")
        time.sleep(0.02)
    # a second run on the same dir while the first is alive is refused
    capsys.readouterr()
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    assert datagen.main(cmd[3:]) == 2 and "in use by another run" in capsys.readouterr().err
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = pairs.read_bytes().count(b"\n")
    # resume in this process (same code path as the CLI; saves a ~3 s interpreter start per run)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    capsys.readouterr()
    assert datagen.main(cmd[3:]) == 0
    printed = capsys.readouterr()

    recs = [json.loads(line) for line in pairs.read_text().splitlines()]
    ids = [x["pair_id"] for x in recs]
    assert len(ids) == len(set(ids)), "a pair was labelled twice"
    assert first < len(ids), "the rerun labelled nothing: the kill came too late to test resuming"
    summary = json.loads((out / "summary.json").read_text())

    # questions: 14 + the low-score one filtered
    assert summary["questions"] | {} == summary["questions"]
    assert (summary["questions"]["read"], summary["questions"]["filtered"], summary["questions"]["kept"]) == (15, 1, 14)
    # links: every used link accounted for, by cause
    L = summary["links"]
    assert L["found"] == 26 and L["used"] == 25  # ok1 is linked twice
    assert L["fetched"] + L["refused_robots"] + sum(L["failed"].values()) + L["offline"] == L["used"]
    assert L["refused_robots"] == 2  # linked directly, and reached through a redirect
    assert L["failed"] == {"http_404": 1, "too_large": 1, "content_type": 1, "too_many_redirects": 1,
                           "timeout": 1, "bad_url": 1}
    assert L["fetched"] == 25 - 8 and L["offline"] == 0
    # the forbidden path never requested, by either run; every good page fetched once over both runs
    pa = S["a"].paths()
    assert not [p for p in pa if p.startswith("/private/")]
    for i in range(1, 15):
        assert pa.count(f"/ok{i}.html") == 1
    assert pa.count("/robots.txt") == 1 and pa.count("/flaky") == 2
    assert S["b"].paths().count("/doc.html") == 1
    assert S["slow"].paths().count("/page.html") == 2  # one retry, then recorded as timeout

    # politeness: one host never sees two requests closer than --host-delay (0.05 s)
    for srv in (S["a"], S["b"]):
        assert min(b - a for a, b in zip(srv.times, srv.times[1:])) >= 0.05

    # pairs: all planned pairs done, failures with causes, nothing pending
    P = summary["pairs"]
    assert P["pending"] == 0 and P["not_in_plan"] == 0
    assert P["labelled"] + P["failed"] == P["planned"] == len(ids)
    assert P["planned"] == (L["fetched"] + 1) + 14  # ok1 belongs to two questions; one negative per question
    T = summary["teacher"]
    # questions 3 and 4 have one fetched page each + their negative; the teacher never labels them
    assert T["failures"] == {"unparseable": 2, "http_500": 2}
    bad = [x for x in recs if x["label"] is None]
    assert {x["question_id"] for x in bad} == {"3", "4"}
    assert all(x["failure"] and x["raw"] is not None for x in bad)
    assert sum(summary["labels"].values()) == P["labelled"]
    neg = [x for x in recs if x["kind"] == "negative"]
    assert len(neg) == 14 and all(x["url"] not in {y["url"] for y in recs if y["question_id"] == x["question_id"]
                                                   and y["kind"] != "negative"} for x in neg)
    good = [x for x in recs if x["label"] is not None]
    assert all(x["explanation"] == "The document is about the topic." and x["prompt_hash"] == prompts.prompt_hash()
               for x in good)
    assert all(len(x["document"]) <= prompts.MAX_DOC_CHARS for x in recs)
    doc1 = next(x for x in recs if x["url"].endswith("/ok1.html"))["document"]
    assert doc1.startswith("Espresso page 1") and "Copyright" not in doc1 and "About" not in doc1

    # train/val: split by question, together exactly the labelled pairs
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == P["labelled"] and train and val
    assert not ({x["question_id"] for x in train} & {x["question_id"] for x in val})
    assert set(train[0]) >= {"query", "document", "explanation", "label"}

    # a 429's Retry-After (0.2 s) wins over the shorter backoff (--teacher-backoff 0.1)
    waits = [t[1][0] - t[0][0] for t in TEACHER_TIMES.values() if t[0][1] == 0 and len(t) > 1]
    assert waits and min(waits) >= 0.2
    # the API key: sent to the teacher, written nowhere, printed nowhere
    assert all(h.get("Authorization") == "Bearer sk-test-SECRET-42" for m, _, h in S["teacher"].log if m == "POST")
    for f in out.rglob("*"):
        if f.is_file():
            assert b"SECRET-42" not in f.read_bytes(), f
    assert "SECRET" not in printed.err + printed.out + str(cmd)

    # a third run does nothing new; the same dir with other settings is refused
    n_post = sum(1 for m, _, _ in S["teacher"].log if m == "POST")
    assert datagen.main(cmd[3:]) == 0 and pairs.read_text().count("\n") == len(ids)
    assert sum(1 for m, _, _ in S["teacher"].log if m == "POST") == n_post
    # --retry-failed: only the 4 failed pairs go to the teacher again (and fail again)
    n_post = sum(1 for m, _, _ in S["teacher"].log if m == "POST")
    assert datagen.main(cmd[3:] + ["--retry-failed"]) == 0
    again = [json.loads(x) for x in pairs.read_text().splitlines()[len(ids):]]
    assert sorted(x["pair_id"] for x in again) == sorted(x["pair_id"] for x in bad)
    assert sum(1 for m, _, _ in S["teacher"].log if m == "POST") - n_post == 2 * 2 + 2 * 3  # parse 1+1, http 1+2
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["pairs"] == P and s2["teacher"]["failures"] == T["failures"]
    assert s2["teacher"]["requests"] == T["requests"] + 2 * 2 + 2 * 3  # every request counted, retries too

    # --offline with the page cache of the first run: no host contacted, cached outcomes reused
    n_pages = len(S["a"].log) + len(S["b"].log) + len(S["slow"].log)
    out2 = tmp_path / "run2"
    assert datagen.main(_cmd(posts, out2, S, "--offline", "--cache", str(out / "pages"), "--max-questions", "2")[3:]) == 0
    assert len(S["a"].log) + len(S["b"].log) + len(S["slow"].log) == n_pages
    L2 = json.loads((out2 / "summary.json").read_text())["links"]
    assert (L2["used"], L2["fetched"], L2["refused_robots"], L2["failed"]) == (6, 3, 1, {"http_404": 1, "too_large": 1})

    # --offline with an empty cache: nothing fetched, nothing to label, still a complete summary
    out3 = tmp_path / "run3"
    assert datagen.main(_cmd(posts, out3, S, "--offline", "--cache", str(tmp_path / "empty"), "--max-questions", "1")[3:]) == 0
    s3 = json.loads((out3 / "summary.json").read_text())
    assert s3["links"]["offline"] == 3 and s3["pairs"]["planned"] == 0 and (out3 / "train.jsonl").read_text() == ""

    capsys.readouterr()
    assert datagen.main(_cmd(posts, out, S, "--format", "label")[3:]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "format: 'explain' -> 'label'" in err and err.count("\n") == 1


def test_teacher_fatal_errors(tmp_path, servers, capsys):
    S = servers
    posts = tmp_path / "Posts.xml"
    write_posts(posts, [question(1, "Espresso", "<p>crema?</p>", accepted=2), answer(2, 1, "<p>espresso crema tips</p>")])
    base = ["--posts", str(posts), "--documents", "answers", "--quiet", "--api-key-env", "TEACHER_KEY"]

    def run(out, url, model, key="sk-test-SECRET-42"):
        env = {"TEACHER_KEY": key}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return datagen.main(base + ["--out", str(tmp_path / out), "--teacher-url", url, "--teacher-model", model])
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert run("o1", dead, "judge-70b") == 2
    assert run("o2", S["teacher"].url, "no-such-model") == 2
    assert not (tmp_path / "o2" / "settings.json").exists()  # a typo must not claim the run dir
    n = len(S["teacher"].log)
    capsys.readouterr()
    assert run("o3", S["teacher"].url, "judge-70b", key="wrong-key-777") == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "wrong-key-777" not in err and "Bearer ***" in err
    # /v1/models, then one chat request answered 401: stopped at once, no retries
    assert [(m, p) for m, p, _ in S["teacher"].log[n:]] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    # a server without /v1/models that rejects the model on the chat request itself
    def no_list(h):
        if h.command == "POST":
            return h.send(404, json.dumps({"error": {"message": "The model `x` does not exist"}}), "application/json")
        return h.send(404, "")
    srv = _Server(no_list)
    try:
        assert run("o5", srv.url, "x") == 2
        assert [m for m, _, _ in srv.log] == ["GET", "POST"]
    finally:
        srv.close()
    # a server that goes away mid-run: stop (exit 2) after the retries, record nothing as failed
    def gone(h):
        if h.command == "GET":
            return h.send(200, json.dumps({"data": [{"id": "judge-70b"}]}), "application/json")
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
    srv = _Server(gone)
    try:
        base += ["--teacher-retries", "2", "--teacher-backoff", "0.01"]
        assert run("o6", srv.url, "judge-70b") == 2
        assert [m for m, _, _ in srv.log] == ["GET", "POST", "POST", "POST"]
        assert (tmp_path / "o6" / "pairs.jsonl").read_text() == ""
        assert json.loads((tmp_path / "o6" / "summary.json").read_text())["pairs"]["pending"] == 1
    finally:
        srv.close()
    assert run("o4", S["teacher"].url, "judge-70b") == 0
    rec = json.loads((tmp_path / "o4" / "pairs.jsonl").read_text())
    assert rec["label"] == 2 and rec["kind"] == "accepted"


def test_http_proxy_is_used(tmp_path):
    """HTTP_PROXY is honoured: a page on an unresolvable host is fetched through a local proxy."""
    from minirank.crawl import Crawler, PageCache

    def proxy(h):  # a forward proxy sees absolute URLs
        if h.path == "http://coffee.invalid/robots.txt":
            return h.send(404, "")
        if h.path == "http://coffee.invalid/page":
            return h.send(200, _page("Via proxy", "proxied page text"))
        return h.send(502, "")
    px = _Server(proxy)
    old = {k: os.environ.get(k) for k in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")}
    try:
        for k in old:
            os.environ.pop(k, None)
        os.environ["HTTP_PROXY"] = px.url
        st = Crawler(PageCache(tmp_path), delay=0, workers=2, timeout=2).crawl(["http://coffee.invalid/page"])
        assert st == {"http://coffee.invalid/page": "ok"}
        assert px.paths() == ["http://coffee.invalid/robots.txt", "http://coffee.invalid/page"]
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        px.close()


def test_local_teacher_smollm2(tmp_path, smol_dir):
    from minirank.tokenizer import Tokenizer
    posts = tmp_path / "Posts.xml"
    write_posts(posts, [question(1, "Espresso crema", "<p>Why no crema?</p>", accepted=2),
                        answer(2, 1, "<p>Old beans give no crema.</p>"),
                        question(3, "Tea", "<p>Green tea temperature?</p>"), answer(4, 3, "<p>About 80 C.</p>")])
    out = tmp_path / "o"
    code = datagen.main(["--posts", str(posts), "--out", str(out), "--documents", "answers", "--negatives", "0",
                         "--teacher", str(smol_dir), "--max-tokens", "12", "--quiet", "--format", "label"])
    assert code == 0
    recs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in recs] == ["1|answer:2", "3|answer:4"]
    tok = Tokenizer.from_dir(smol_dir)
    for r in recs:
        # the teacher saw exactly the student's prompt
        assert r["usage"]["prompt_tokens"] == len(prompts.prompt_ids(tok, r["query"], r["document"], "label"))
        assert 0 < r["usage"]["completion_tokens"] <= 12
        assert (r["label"] in prompts.LABELS) != (r["failure"] == "unparseable")
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"]["labelled"] + s["pairs"]["failed"] == 2


@pytest.mark.skipif(not COFFEE.is_file(), reason="shared coffee dump absent")
def test_structure_teacher_on_coffee(tmp_path, capsys):
    """Offline data with no model: labels from the thread, on the real dump."""
    out = tmp_path / "coffee"
    assert datagen.main(["--posts", str(COFFEE), "--out", str(out), "--documents", "answers",
                         "--teacher", "structure", "--max-docs", "3", "--quiet"]) == 0
    qs, _ = read_questions(COFFEE)
    n_acc = sum(any(a.id == q.accepted_id and a.text.strip() for a in q.ordered_answers()[:3]) for q in qs)
    n_docs = sum(min(3, sum(bool(a.text.strip()) for a in q.answers)) for q in qs)
    n_q = sum(bool(q.answers) for q in qs)
    s = json.loads((out / "summary.json").read_text())
    assert s["labels"] == {"2": n_acc, "1": n_docs - n_acc, "0": n_q}
    assert s["pairs"]["labelled"] == s["pairs"]["planned"] == n_docs + n_q and s["pairs"]["failed"] == 0
    rows = [json.loads(x) for f in ("train.jsonl", "val.jsonl") for x in (out / f).read_text().splitlines()]
    assert len(rows) == n_docs + n_q
    assert all(r["explanation"] == StructureTeacher.WHY[r["kind"]] and r["label"] == StructureTeacher.LABELS[r["kind"]]
               for r in rows)
    # the negative is another question's answer
    own = {q.id: {f"answer:{a.id}" for a in q.answers} for q in qs}
    assert all(r["url"] not in own[r["question_id"]] for r in rows if r["kind"] == "negative")
    assert datagen.main(["--posts", str(COFFEE), "--out", str(tmp_path / "w"), "--teacher", "structure", "--quiet"]) == 2
    assert "needs --documents answers" in capsys.readouterr().err


def test_local_teacher_not_loadable(tmp_path, monkeypatch, capsys):
    """A hub spec that cannot be served (here: offline, not cached) is one line and exit 2, no traceback."""
    posts = tmp_path / "Posts.xml"
    write_posts(posts, [question(1, "Espresso", "<p>crema?</p>", accepted=2), answer(2, 1, "<p>tips</p>")])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert datagen.main(["--posts", str(posts), "--out", str(tmp_path / "o"), "--documents", "answers",
                         "--teacher", "nosuch/model", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py data: error: cannot load teacher model 'nosuch/model'") and err.count("\n") == 1


def test_settings_file_that_is_not_an_object(tmp_path, capsys):
    posts = tmp_path / "Posts.xml"
    write_posts(posts, [question(1, "Espresso", "<p>crema?</p>", accepted=2), answer(2, 1, "<p>tips</p>")])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "settings.json").write_text("[]")
    capsys.readouterr()
    assert datagen.main(["--posts", str(posts), "--out", str(tmp_path / "o"), "--documents", "answers",
                         "--teacher", "structure", "--quiet"]) == 2
    assert "settings.json: expected a job's settings (a JSON object), got list" in capsys.readouterr().err


def test_pairs_file_torn_tail_and_bad_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    good = [json.dumps({"pair_id": "1|a", "label": None, "failure": "http_500"}),
            json.dumps({"pair_id": "1|a", "label": 2}), json.dumps({"pair_id": "1|a", "label": None}),
            json.dumps({"pair_id": "2|b", "label": None})]
    p.write_text("\n".join(good) + "\n" + '{"pair_id": "3|c", "lab')  # killed mid-write
    final = datagen.read_pairs(p)
    offsets = [0]
    for g in good:
        offsets.append(offsets[-1] + len(g) + 1)
    # a labelled record is final; a failure is superseded by a later record of its pair
    assert final == {"1|a": (True, offsets[1]), "2|b": (False, offsets[3])}
    assert p.read_text() == "\n".join(good) + "\n"  # the torn line is gone, the rest untouched
    p.write_text(good[0] + "\nnot json\n")
    with pytest.raises(datagen.UsageError, match=r"pairs.jsonl:2: not a pair record"):
        datagen.read_pairs(p)
    p.write_text('{"pair_id": "x"')  # only a torn line
    assert datagen.read_pairs(p) == {} and p.read_text() == ""
