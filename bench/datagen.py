"""Teacher-data pipeline speed and memory, against the bounds the setup itself imposes.

    python bench/datagen.py                 # all three parts
    python bench/datagen.py --part teacher  # or crawl, stream; --stream-mb 1024 --requests 1920

teacher: APITeacher with 64 requests in flight against a local chat-completions server that answers
         every request after 200 ms (ThreadingHTTPServer, HTTP/1.1 keep-alive), prompts with 4 kB
         documents, results appended to a JSONL file with one fsync per batch of completed results, as the
         pipeline does.
         Ideal = 64 / 0.2 s = 320 requests/s; printed: achieved / ideal (goal >= 0.90).
crawl:   Crawler over 2,000 pages on 50 local hosts (one server per port), 1 s per-host delay, 32
         workers. Each host owes 40 requests -> politeness bound 40 s (robots.txt adds one more
         request per host, counted against us). Printed: time / bound (goal <= 1.2).
stream:  a synthetic Posts.xml of --stream-mb MB (questions + answers with links, the dump's format)
         written to /tmp and deleted after; read_questions (--max-questions 20000, the paper's scale;
         the whole file is still read for their answers) in a fresh process. Printed: peak RSS growth over the process' RSS before
         reading (goal < 200 MB) and MB/s.
extract: main-text extraction on the hand-made fixture pages (tests/fixtures/datagen/*.html, each with
         its main text written by hand in the .txt next to it): word-multiset precision/recall/F1 for
         minirank.crawl.html_text and, when installed, trafilatura.extract.
All servers run on 127.0.0.1 in a child process (so they do not share this process' GIL).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------


_TEACHER_SERVER = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
latency = float(sys.argv[1])
class Q(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    def handle_error(self, *a): pass
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers (uvicorn, llama.cpp) do; else headers and body
                                    # in two writes meet the client's delayed ACK: +40 ms per request
    def log_message(self, *a): pass
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(latency)
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content":
                            "Mostly on topic.\\n\\nRelevance Label: 2"}}],
                           "usage": {"prompt_tokens": len(req["messages"][0]["content"]) // 4,
                                     "completion_tokens": 9}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
s = Q(("127.0.0.1", 0), H)
threading.Thread(target=s.serve_forever, daemon=True).start()
print(s.server_address[1], flush=True)
sys.stdin.read()
"""


def bench_teacher(n_requests, inflight=64, latency=0.2):
    from minirank.teacher import APITeacher
    proc = subprocess.Popen([sys.executable, "-c", _TEACHER_SERVER, str(latency)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{proc.stdout.readline().strip()}/v1"
    t = APITeacher(url, "bench", inflight=inflight, max_tokens=64)
    doc = ("coffee grind extraction water temperature " * 100)[:4000]
    items = ((str(i), f"question {i} about espresso", doc, "linked") for i in range(n_requests))
    try:
        with tempfile.TemporaryDirectory() as d, open(Path(d) / "pairs.jsonl", "a") as f:
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for batch in t.label(items):
                for key, res in batch:
                    assert res.label == 2, res
                    f.write(json.dumps({"pair_id": key, "label": res.label, "explanation": res.explanation,
                                        "document": doc}) + "\n")
                f.flush()
                os.fsync(f.fileno())  # as the pipeline does: one fsync per batch of completed pairs
                n += len(batch)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        proc.stdin.close()
        proc.wait()
    ideal = inflight / latency
    rate = n / dt
    print(f"teacher: {n} requests, {inflight} in flight, server latency {latency * 1000:.0f} ms: "
          f"{rate:.1f} req/s vs ideal {ideal:.0f} -> ratio {rate / ideal:.3f} (goal >= 0.90); "
          f"client CPU {1000 * cpu / n:.2f} ms/request")
    return rate / ideal


# ----------------------------------------------------------------------------------------------

_CRAWL_SERVERS = r"""
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Q(ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, *a): pass
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/robots.txt":
            body, ctype = b"User-agent: *\nDisallow: /private/\n", "text/plain"
        else:
            body = ("<html><head><title>Page %s</title></head><body><nav><a href='/'>Home</a></nav><main><p>"
                    % self.path + "espresso extraction and grind size " * 60 + "</p></main></body></html>").encode()
            ctype = "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ports = []
for _ in range(int(sys.argv[1])):
    s = Q(("127.0.0.1", 0), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    ports.append(s.server_address[1])
print(" ".join(map(str, ports)), flush=True)
sys.stdin.read()
"""


def bench_crawl(n_pages=2000, n_hosts=50, delay=1.0, workers=32):
    from minirank.crawl import Crawler, PageCache
    proc = subprocess.Popen([sys.executable, "-c", _CRAWL_SERVERS, str(n_hosts)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    ports = proc.stdout.readline().split()
    urls = [f"http://127.0.0.1:{ports[i % n_hosts]}/p{i}.html" for i in range(n_pages)]
    env = {k: os.environ.pop(k) for k in list(os.environ) if k.lower() in ("http_proxy", "https_proxy", "all_proxy")}
    try:
        with tempfile.TemporaryDirectory() as d:
            c = Crawler(PageCache(d), delay=delay, workers=workers, timeout=10)
            t0 = time.perf_counter()
            st = c.crawl(urls)
            dt = time.perf_counter() - t0
    finally:
        os.environ.update(env)
        proc.stdin.close()
        proc.wait()
    ok = sum(v == "ok" for v in st.values())
    bound = (n_pages / n_hosts) * delay
    print(f"crawl: {ok}/{n_pages} pages ok over {n_hosts} hosts, {delay:g} s per-host delay, {workers} workers, "
          f"{c.requests} requests (robots.txt included): {dt:.1f} s vs politeness bound {bound:.0f} s "
          f"-> ratio {dt / bound:.3f} (goal <= 1.2)")
    return dt / bound


# ----------------------------------------------------------------------------------------------


def write_synthetic_posts(path, mb):
    """Questions with 2 answers each, bodies ~1 kB of HTML with links; ids ascending like the dumps."""
    from xml.sax.saxutils import quoteattr
    para = "<p>" + "Grind the beans just before brewing and keep the water near 94 C. " * 8 + "</p>\n"
    target = mb * 2 ** 20
    with open(path, "w", encoding="utf-8") as f:
        f.write('\ufeff<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        i, size = 1, 0
        while size < target:
            q = (f'  <row Id="{i}" PostTypeId="1" AcceptedAnswerId="{i + 1}" Score="{i % 7}" '
                 f'Body={quoteattr(para * 2)} Title="How do I brew question {i}?" Tags="&lt;brewing&gt;" '
                 f'AnswerCount="2" />\n')
            rows = [q]
            for j in (1, 2):
                body = para + f'<p>See <a href="https://example{i % 97}.org/page/{i + j}">this</a></p>\n'
                rows.append(f'  <row Id="{i + j}" PostTypeId="2" ParentId="{i}" Score="{j}" '
                            f'Body={quoteattr(body)} />\n')
            chunk = "".join(rows)
            f.write(chunk)
            size += len(chunk)
            i += 3
        f.write("</posts>\n")


_STREAM_CHILD = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[2])
from minirank.stackexchange import read_questions
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
base = rss_mb()
t0 = time.perf_counter()
qs, st = read_questions(sys.argv[1], max_questions=int(sys.argv[3]))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{base:.1f} {peak:.1f} {dt:.2f} {st.rows} {st.kept} {st.answers_kept}")
"""


def bench_stream(mb, max_questions=20000):
    path = Path(tempfile.gettempdir()) / f"minirank_bench_posts_{os.getpid()}.xml"
    try:
        t0 = time.perf_counter()
        write_synthetic_posts(path, mb)
        size = path.stat().st_size
        print(f"stream: wrote {size / 2 ** 20:.0f} MB synthetic Posts.xml in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(path), str(ROOT), str(max_questions)],
                             capture_output=True, text=True, check=True).stdout.split()
    finally:
        path.unlink(missing_ok=True)
    base, peak, dt = map(float, out[:3])
    rows, kept, answers = map(int, out[3:])
    print(f"stream: {rows} rows, {kept} questions kept (--max-questions {max_questions}) with {answers} answers, "
          f"read in {dt:.1f} s ({size / 2 ** 20 / dt:.0f} MB/s): peak RSS {peak:.0f} MB, "
          f"growth {peak - base:.0f} MB over {base:.0f} MB at start (goal < 200 MB)")
    return peak - base


def _f1(pred: str, gold: str) -> tuple[float, float, float]:
    """Word-multiset precision, recall, F1 of extracted text against the hand-written main text."""
    import re
    from collections import Counter
    p, g = Counter(re.findall(r"\w+", pred.lower())), Counter(re.findall(r"\w+", gold.lower()))
    hit = sum((p & g).values())
    prec, rec = hit / max(1, sum(p.values())), hit / max(1, sum(g.values()))
    return prec, rec, 2 * prec * rec / max(1e-9, prec + rec)


def bench_extract():
    from minirank.crawl import html_text
    fix = ROOT / "tests" / "fixtures" / "datagen"
    pages = sorted(p for p in fix.glob("*.html") if p.with_suffix(".txt").exists())
    try:
        import trafilatura
    except ImportError:
        trafilatura = None
    rows = []
    for p in pages:
        html, gold = p.read_text(), p.with_suffix(".txt").read_text()
        ours = _f1(html_text(html), gold)
        theirs = _f1(trafilatura.extract(html, include_comments=False, include_tables=False) or "", gold) \
            if trafilatura else None
        rows.append((p.stem, ours, theirs))
        print(f"extract {p.stem:10s} minirank P/R/F1 {ours[0]:.2f}/{ours[1]:.2f}/{ours[2]:.2f}" +
              (f"   trafilatura {theirs[0]:.2f}/{theirs[1]:.2f}/{theirs[2]:.2f}" if theirs else ""))
    mean = lambda i: sum(r[i][2] for r in rows) / len(rows)  # noqa: E731
    print(f"extract: mean F1 over {len(rows)} fixture pages: minirank {mean(1):.3f}" +
          (f", trafilatura {trafilatura.__version__} {mean(2):.3f}" if trafilatura else
           " (trafilatura not installed: pip install trafilatura to compare)"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("teacher", "crawl", "stream", "extract", "all"), default="all")
    ap.add_argument("--requests", type=int, default=1920, help="teacher requests (6 s at the ideal rate)")
    ap.add_argument("--stream-mb", type=int, default=1024)
    a = ap.parse_args()
    if a.part in ("teacher", "all"):
        bench_teacher(a.requests)
    if a.part in ("crawl", "all"):
        bench_crawl()
    if a.part in ("extract", "all"):
        bench_extract()
    if a.part in ("stream", "all"):
        bench_stream(a.stream_mb)


if __name__ == "__main__":
    main()
