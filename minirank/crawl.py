"""A polite web fetcher for the pages StackExchange answers link to, and HTML -> main text.

Politeness and robustness, as a production crawler does it:
- robots.txt fetched once per host (through the same session, so proxies apply) and obeyed for every
  request, redirect hops included (redirects are followed by hand for that reason, up to a limit);
  RFC 9309: a 4xx robots.txt allows everything, an unreachable one (5xx, network error) forbids.
- one request at a time per host, `delay` seconds (or the host's Crawl-delay, if longer) between the
  end of one and the start of the next; `workers` requests in flight over all hosts.
- connect/read timeouts and a whole-download deadline; a size cap (Content-Length checked first,
  then the stream is cut); only HTML and plain text are read; retries with exponential backoff on
  429/5xx/timeouts/connection errors, honouring Retry-After.
- every outcome is cached on disk by URL hash (`PageCache`), failures with their cause, so a rerun
  never fetches a page twice (`refetch_failed` retries the failures).
HTTP(S)_PROXY / NO_PROXY are honoured (requests' environment handling).
"""

import hashlib
import heapq
import json
import os
import re
import threading
import time
import urllib.robotparser
from collections import deque
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

USER_AGENT = "minirank-datagen/0.1 (+https://github.com/minirank; research crawler)"
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
RETRY_CODES = {429, 500, 502, 503, 504}

# ----------------------------------------------------------------------------------------------
# HTML -> main text (stdlib html.parser). Boilerplate elements are dropped with everything inside
# them; so are elements whose class/id names them as navigation, ads, cookie banners, comments...;
# blocks that are mostly link text (menus, tag clouds) are dropped; when the page marks its main
# content (<main>, <article>, role=main) and that holds most of the text, only it is kept.

_SKIP = {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form",
         "iframe", "button", "select", "textarea", "object", "canvas", "head", "menu", "dialog"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
         "track", "wbr"}
_BLOCKS = {"p", "div", "section", "article", "main", "pre", "blockquote", "li", "ul", "ol", "dl", "dt",
           "dd", "table", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "figure",
           "figcaption", "body", "html", "caption", "address", "details", "summary"}
_BOILER = re.compile(r"(^|[\s_-])(nav|navbar|navbox|menu|sidebar|footer|header|breadcrumbs?|cookie|consent|banner|"
                     r"advert|ads?|sponsor|share|social|related|comments?|popup|modal|newsletter|subscribe|"
                     r"skip-link|toolbar|meta|byline|tags|infobox|references?|editsection|catlinks|noprint|"
                     r"copyright|legal|pagination|widget|toc)($|[\s_-])", re.I)
_LEGAL = re.compile(r"^(©|\(c\)|copyright\b)|©\s*\d{4}|all rights reserved", re.I)


class _Extractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skip = []          # tag names of open skipped elements
        self.main_depth = 0     # inside <main>/<article>/role=main
        self.main_tags = []
        self.pre = 0
        self.title, self.in_title = [], False
        self.blocks = []        # (text, link_chars, in_main)
        self.cur, self.cur_link, self.link_depth = [], 0, 0
        self.cur_main = False

    def _flush(self):
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(self.cur)).strip()
        if text:
            self.blocks.append((text, self.cur_link, self.cur_main))
        self.cur, self.cur_link = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "title" and not self.skip:
            self.in_title = True
            return
        if tag in _VOID:
            if tag in ("br", "hr") and not self.skip:
                self._flush()
            return
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.append(tag)
            return
        a = dict(attrs)
        names = f"{a.get('class') or ''} {a.get('id') or ''} {a.get('role') or ''}"
        if tag in _SKIP or (tag not in ("body", "html", "main", "article") and _BOILER.search(names)) \
                or a.get("aria-hidden") == "true" or "hidden" in a:
            self._flush()
            self.skip.append(tag)
            return
        if tag in _BLOCKS:
            self._flush()
        if tag in ("main", "article") or a.get("role") == "main":
            self.main_depth += 1
            self.main_tags.append(tag)
            self.cur_main = True
        if tag == "pre":
            self.pre += 1
        if tag == "a":
            self.link_depth += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
            return
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if tag in _BLOCKS:
            self._flush()
        if self.main_tags and tag == self.main_tags[-1]:
            self.main_tags.pop()
            self.main_depth -= 1
            self.cur_main = self.main_depth > 0
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag == "a":
            self.link_depth = max(0, self.link_depth - 1)

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
            return
        if self.skip:
            return
        if self.pre:  # keep code layout: each line its own block
            lines = data.split("\n")
            for i, ln in enumerate(lines):
                if i:
                    self._flush()
                self.cur.append(ln)
            return
        data = re.sub(r"\s+", " ", data)
        self.cur.append(data)
        if self.link_depth:
            self.cur_link += len(data.strip())


def html_text(html: str) -> str:
    """Main text of an HTML page: its title, a blank line, then the content blocks one per line."""
    p = _Extractor()
    try:
        p.feed(html)
        p.close()
    except Exception:  # html.parser is lenient; this guards pathological input only
        pass
    p._flush()
    # menus and link lists: short blocks that are mostly link text
    # and copyright lines
    blocks = [(t, m) for t, link, m in p.blocks
              if not (link > 0.6 * len(t) and len(t) < 300) and not (len(t) < 200 and _LEGAL.search(t))]
    total = sum(len(t) for t, _ in blocks)
    main = sum(len(t) for t, m in blocks if m)
    if main and main >= 0.5 * total:
        blocks = [(t, m) for t, m in blocks if m]
    title = re.sub(r"\s+", " ", "".join(p.title)).strip()
    body = "\n".join(t for t, _ in blocks)
    return f"{title}\n\n{body}".strip() if title and not body.startswith(title) else body


# ----------------------------------------------------------------------------------------------
# Disk cache: one JSON file per URL, named by the URL's sha1, written atomically.


@dataclass
class Page:
    url: str
    status: str           # "ok", or the failure cause: robots, http_404, too_large, content_type, ...
    final_url: str = ""
    text: str = ""
    detail: str = ""


class PageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        h = hashlib.sha1(url.encode("utf-8")).hexdigest()
        return self.root / h[:2] / f"{h}.json"

    def get(self, url: str) -> Page | None:
        p = self.path(url)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn file cannot happen with os.replace, but never trust the disk blindly
            return None
        try:  # another program's file, or one of an older layout: a miss, fetched again
            return Page(**d) if d.get("url") == url else None
        except (AttributeError, TypeError):
            return None

    def put(self, page: Page):
        p = self.path(page.url)
        p.parent.mkdir(exist_ok=True)
        tmp = p.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps(asdict(page), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, p)


# ----------------------------------------------------------------------------------------------
# The crawler


def _host(url: str) -> str:
    s = urlsplit(url)
    return f"{s.scheme}://{s.netloc}".lower()


def retry_after(r) -> float | None:
    """Seconds a response's Retry-After asks for (delta-seconds or an HTTP date), None when absent
    or unreadable. The teacher client (teacher.py) honours it the same way."""
    v = r.headers.get("Retry-After")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _charset(content_type: str, head: bytes) -> str:
    m = re.search(r"charset=[\"']?([\w.:-]+)", content_type, re.I) or \
        re.search(rb"<meta[^>]+charset=[\"']?([\w.:-]+)", head[:4096], re.I)
    cs = m.group(1) if m else "utf-8"
    cs = cs.decode("ascii", "replace") if isinstance(cs, bytes) else cs
    try:
        "".encode(cs)
        return cs
    except LookupError:
        return "utf-8"


@dataclass
class _Job:
    url: str           # the link as found (cache key)
    cur: str           # the URL to request now (differs after redirects)
    hops: int = 0
    attempt: int = 0


class _Host:
    __slots__ = ("queue", "next_ok", "busy", "queued", "robots", "delay")

    def __init__(self, delay):
        self.queue, self.next_ok, self.busy, self.queued = deque(), 0.0, False, False
        self.robots = None  # None: not fetched yet; else (RobotFileParser | None, cause)
        self.delay = delay


class Crawler:
    def __init__(self, cache: PageCache, delay=1.0, workers=32, timeout=20.0, max_bytes=2_000_000,
                 max_redirects=5, retries=3, backoff=1.0, max_wait=60.0, user_agent=USER_AGENT,
                 session: requests.Session | None = None):
        self.cache, self.delay, self.workers, self.timeout = cache, delay, workers, timeout
        self.max_bytes, self.max_redirects, self.retries = max_bytes, max_redirects, retries
        self.backoff, self.max_wait, self.user_agent = backoff, max_wait, user_agent
        self.session = session or requests.Session()
        # keep-alive pools for many hosts at once (requests keeps 10 by default, then reconnects)
        adapter = requests.adapters.HTTPAdapter(pool_connections=max(64, workers), pool_maxsize=4)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        self.session.max_redirects = max_redirects
        self.requests = 0  # HTTP requests made (robots.txt included)

    # -- one request, no retries: returns ("redirect", url) | ("retry", cause, wait) | ("done", Page)
    def _request(self, job: _Job):
        try:
            r = self.session.get(job.cur, stream=True, allow_redirects=False,
                                 timeout=(min(10.0, self.timeout), self.timeout))
        except requests.Timeout:
            return "retry", "timeout", None
        except requests.ConnectionError:
            return "retry", "connection", None
        except requests.RequestException as e:
            return "done", Page(job.url, "bad_url", job.cur, detail=str(e)[:200])
        with r:
            if r.is_redirect and r.headers.get("Location"):
                return "redirect", urljoin(job.cur, r.headers["Location"])
            if r.status_code in RETRY_CODES:
                return "retry", f"http_{r.status_code}", retry_after(r)
            if r.status_code != 200:
                return "done", Page(job.url, f"http_{r.status_code}", job.cur)
            ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype and ctype not in TEXT_TYPES:
                return "done", Page(job.url, "content_type", job.cur, detail=ctype)
            if int(r.headers.get("Content-Length") or 0) > self.max_bytes:
                return "done", Page(job.url, "too_large", job.cur, detail=r.headers["Content-Length"])
            deadline, buf = time.monotonic() + 3 * self.timeout, bytearray()
            try:
                for chunk in r.iter_content(65536):
                    buf += chunk
                    if len(buf) > self.max_bytes:
                        return "done", Page(job.url, "too_large", job.cur, detail=f">{self.max_bytes}")
                    if time.monotonic() > deadline:
                        return "retry", "timeout", None
            except requests.RequestException as e:  # a read timeout mid-body arrives as ConnectionError
                return "retry", "timeout" if "timed out" in str(e).lower() else "connection", None
            raw = bytes(buf)
            if not ctype and b"\x00" in raw[:4096]:  # no type given: refuse what looks binary
                return "done", Page(job.url, "content_type", job.cur, detail="binary")
            text = raw.decode(_charset(r.headers.get("Content-Type", ""), raw), errors="replace")
            if ctype != "text/plain":
                text = html_text(text)
            if not text.strip():
                return "done", Page(job.url, "empty", job.cur)
            return "done", Page(job.url, "ok", job.cur, text=text)

    def _robots(self, host: str):
        """(parser, '') | (None, ''): no robots.txt, allow all | (False, cause): unreachable, forbid all."""
        try:
            r = self.session.get(host + "/robots.txt", timeout=(min(10.0, self.timeout), self.timeout),
                                 stream=True)
            with r:
                if 400 <= r.status_code < 500:
                    return None, ""
                if r.status_code != 200:
                    return False, "robots_unavailable"
                body = b""
                for chunk in r.iter_content(65536):  # (iter_content wraps urllib3's errors)
                    body += chunk
                    if len(body) >= 512_000:  # RFC 9309: parse at least the first 500 KiB
                        break
        except requests.RequestException:
            return False, "robots_unavailable"
        rp = urllib.robotparser.RobotFileParser()
        rp.parse(body.decode("utf-8", errors="replace").splitlines())
        return rp, ""

    def _allowed(self, host: _Host, url: str) -> str:
        rp, cause = host.robots
        if rp is False:
            return cause
        if rp is not None and not rp.can_fetch(self.user_agent, url):
            return "robots"
        return ""

    def crawl(self, urls, offline=False, refetch_failed=False, progress=False) -> dict[str, str]:
        """Fetch every URL not cached yet; returns {url: status} ("ok" or failure cause) for all."""
        status = {}
        todo = []
        for u in dict.fromkeys(urls):
            page = self.cache.get(u)
            if page is not None and (page.status == "ok" or not refetch_failed):
                status[u] = page.status
            elif offline:
                status[u] = "offline"
            else:
                s = urlsplit(u)
                if s.scheme not in ("http", "https") or not s.hostname:
                    self.cache.put(Page(u, "bad_url", u))
                    status[u] = "bad_url"
                else:
                    todo.append(u)
        if not todo:
            return status
        hosts: dict[str, _Host] = {}
        heap = []  # (next_ok, seq, host key) of idle hosts with queued jobs
        seq = [0]
        cv = threading.Condition()
        left = [len(todo)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="fetch", unit="page")

        def enqueue(job: _Job, front=False):  # under cv
            k = _host(job.cur)
            h = hosts.get(k)
            if h is None:
                h = hosts[k] = _Host(self.delay)
            (h.queue.appendleft if front else h.queue.append)(job)
            if not h.busy and not h.queued:
                h.queued = True
                seq[0] += 1
                heapq.heappush(heap, (h.next_ok, seq[0], k))
                cv.notify()

        def release(k: str, h: _Host, after: float | None):  # under cv
            h.busy = False
            if after is not None:
                h.next_ok = max(h.next_ok, time.monotonic() + after)
            if h.queue and not h.queued:
                h.queued = True
                seq[0] += 1
                heapq.heappush(heap, (h.next_ok, seq[0], k))
            cv.notify_all()

        def finish(page: Page):
            self.cache.put(page)
            with cv:
                status[page.url] = page.status
                left[0] -= 1
                cv.notify_all()
            if bar is not None:
                bar.update(1)

        def worker():
            while True:
                with cv:
                    while True:
                        if left[0] == 0:
                            return
                        now = time.monotonic()
                        if heap and heap[0][0] <= now:
                            _, _, k = heapq.heappop(heap)
                            h = hosts[k]
                            h.queued, h.busy = False, True
                            job = h.queue.popleft()
                            break
                        cv.wait(timeout=(heap[0][0] - now) if heap else 1.0)
                if h.robots is None:
                    try:
                        h.robots = self._robots(k)
                    except Exception:  # e.g. an undecodable robots.txt: treat as unreachable
                        h.robots = (False, "robots_unavailable")
                    with cv:
                        self.requests += 1
                    rp = h.robots[0]
                    if rp:
                        cd = rp.crawl_delay(self.user_agent)
                        if cd:
                            h.delay = max(h.delay, min(float(cd), self.max_wait))
                    with cv:
                        h.queue.appendleft(job)
                        release(k, h, h.delay)
                    continue
                cause = self._allowed(h, job.cur)
                if cause:
                    with cv:
                        release(k, h, None)  # no request made: no delay owed
                    finish(Page(job.url, cause, job.cur))
                    continue
                with cv:
                    self.requests += 1
                try:
                    res = self._request(job)
                except Exception as e:  # never lose a worker: the crawl would wait for it forever
                    res = ("done", Page(job.url, "error", job.cur, detail=f"{type(e).__name__}: {str(e)[:200]}"))
                wait = h.delay
                if res[0] == "redirect":
                    nxt = res[1]
                    if job.hops + 1 > self.max_redirects:
                        res = ("done", Page(job.url, "too_many_redirects", job.cur))
                    elif urlsplit(nxt).scheme not in ("http", "https"):
                        res = ("done", Page(job.url, "bad_url", nxt))
                    else:
                        with cv:
                            release(k, h, wait)
                            enqueue(_Job(job.url, nxt, job.hops + 1, job.attempt))
                        continue
                elif res[0] == "retry":
                    if job.attempt < self.retries:
                        ra = res[2]
                        backoff = min(self.max_wait, ra if ra is not None else self.backoff * 2 ** job.attempt)
                        with cv:
                            job.attempt += 1
                            h.queue.appendleft(job)
                            release(k, h, max(wait, backoff))
                        continue
                    res = ("done", Page(job.url, res[1], job.cur, detail=f"after {job.attempt + 1} attempts"))
                with cv:
                    release(k, h, wait)
                finish(res[1])

        with cv:
            for u in todo:
                enqueue(_Job(u, u))
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, self.workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if bar is not None:
            bar.close()
        return status

