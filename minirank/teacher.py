"""Teachers that label (question, document) prompts: an OpenAI-compatible chat-completions server
(vLLM, llama.cpp server, SGLang, any hosted endpoint) with many requests in flight, or a local model
run through `minirank.generate`.

All take (key, query, document, kind) items and yield lists of (key, Result) as results complete: a list
holds everything that finished since the last one, so the caller can make them durable with one fsync
(group commit: an fsync costs milliseconds, a per-result fsync would cap the rate near 250/s). A Result is a
label with its explanation, or a failure with its cause; problems that make every further request
pointless (bad API key, unknown model, no server) raise `TeacherFatal` instead.
"""

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import requests

from . import prompts
from .crawl import retry_after

RETRY_CODES = {408, 409, 425, 429, 500, 502, 503, 504}


class TeacherFatal(RuntimeError):
    """Stop the run: the teacher cannot work with these settings (message is one line)."""


@dataclass
class Result:
    text: str = ""                  # the teacher's raw answer (last attempt)
    label: int | None = None
    explanation: str = ""
    failure: str | None = None      # cause when label is None: unparseable, http_500, timeout, ...
    detail: str = ""
    attempts: int = 0
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})


def split_answer(text: str, fmt: str) -> tuple[int | None, str]:
    """(label, explanation) of a teacher answer; the explanation is what precedes the label line."""
    label = prompts.parse_label(text)
    if label is None or fmt == "label":
        return label, ""
    return label, text[:text.rfind(prompts.LABEL_PREFIX)].strip()


def _error_text(r) -> str:
    try:
        e = r.json().get("error", r.json())
        return str(e.get("message", e) if isinstance(e, dict) else e)[:300]
    except (ValueError, AttributeError):
        return r.text[:300]


def api_urls(base_url: str) -> tuple[str, str]:
    """(chat completions URL, models URL) from a base URL given with or without /v1."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions", base + "/models"


class APITeacher:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, fmt: str = "explain",
                 inflight: int = 16, max_tokens: int = 1024, retries: int = 6, parse_retries: int = 2,
                 timeout: float = 120.0, backoff: float = 1.0, max_wait: float = 60.0, key_env: str = ""):
        self.url, self.models_url = api_urls(base_url)
        self.model, self.fmt, self.inflight, self.max_tokens = model, fmt, inflight, max_tokens
        self.retries, self.parse_retries, self.timeout = retries, parse_retries, timeout
        self.backoff, self.max_wait, self.key_env = backoff, max_wait, key_env
        self.name = model
        self.session = requests.Session()
        # one URL for the whole run: resolve HTTP(S)_PROXY/NO_PROXY once instead of per request
        # (requests' per-request environment merge, netrc lookup included, costs ~0.3 ms of CPU)
        self.session.proxies = requests.utils.get_environ_proxies(self.url)
        self.session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=max(10, inflight))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._key = api_key
        if api_key:  # kept in the session only: never printed, never written
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.stop = threading.Event()

    def _err(self, r) -> str:
        """The server's error message, with the API key blanked should the server echo it back."""
        text = _error_text(r)
        return text.replace(self._key, "***") if self._key else text

    def _auth_fatal(self, r):
        hint = f" (the key comes from ${self.key_env})" if self.key_env else ""
        return TeacherFatal(f"teacher {self.url} refused the request: HTTP {r.status_code} {self._err(r)}{hint}")

    def _is_model_error(self, r) -> bool:
        return r.status_code == 404 or (r.status_code in (400, 422) and "model" in self._err(r).lower())

    def check(self):
        """Fail fast before any work: server reachable, key accepted, model served (if listed)."""
        try:
            r = self.session.get(self.models_url, timeout=min(30.0, self.timeout))
        except requests.RequestException as e:
            raise TeacherFatal(f"teacher unreachable at {self.models_url}: {type(e).__name__}") from None
        if r.status_code in (401, 403):
            raise self._auth_fatal(r)
        if r.status_code == 200:
            try:
                ids = [m.get("id") for m in r.json().get("data", [])]
            except (ValueError, AttributeError):
                ids = []
            if ids and self.model not in ids:
                raise TeacherFatal(f"teacher {self.url} does not serve model {self.model!r} "
                                   f"(it lists: {', '.join(map(str, ids[:10]))})")

    def _one(self, messages) -> Result:
        res = Result()
        parse_fails, transient = 0, 0
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens,
                "stop": [prompts.STOP]}
        while not self.stop.is_set():
            res.attempts += 1
            wait_s, cause = None, None
            try:
                r = self.session.post(self.url, json=body, timeout=self.timeout)
            except requests.Timeout:
                cause = "timeout"
            except requests.ConnectionError:
                cause = "connection"
            except requests.RequestException as e:  # e.g. a body cut off mid-transfer
                cause, res.detail = "network", f"{type(e).__name__}: {str(e)[:100]}"
            else:
                if r.status_code in (401, 403):
                    self.stop.set()
                    raise self._auth_fatal(r)
                if r.status_code in RETRY_CODES:
                    cause, wait_s = f"http_{r.status_code}", retry_after(r)
                elif self._is_model_error(r):
                    self.stop.set()
                    raise TeacherFatal(f"teacher {self.url} rejected model {self.model!r}: HTTP {r.status_code} "
                                       f"{self._err(r)}")
                elif r.status_code != 200:  # e.g. 400 prompt too long: this pair can never succeed
                    res.failure, res.detail = f"http_{r.status_code}", self._err(r)
                    return res
                else:
                    try:
                        d = r.json()
                        text = d["choices"][0]["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError("content is not a string")
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        cause = "malformed_response"
                        res.detail = f"{type(e).__name__}: {str(e)[:100]}"
                    else:
                        u = d.get("usage") or {}
                        for k in ("prompt_tokens", "completion_tokens"):
                            res.usage[k] += int(u.get(k) or 0)
                        res.text = text
                        res.label, res.explanation = split_answer(text, self.fmt)
                        if res.label is not None:
                            res.failure = res.detail = None
                            return res
                        parse_fails += 1
                        if parse_fails > self.parse_retries:
                            res.failure, res.detail = "unparseable", text[-200:]
                            return res
                        continue
            transient += 1
            if transient > self.retries:
                if cause == "connection":  # the server is gone, not this pair's fault: stop, keep it pending
                    self.stop.set()
                    raise TeacherFatal(f"teacher {self.url} stopped answering ({res.attempts} connection "
                                       f"failures in a row); rerun the same command to continue")
                res.failure = cause
                res.detail = res.detail or f"after {res.attempts} attempts"
                return res
            delay = wait_s if wait_s is not None else self.backoff * 2 ** (transient - 1)
            self.stop.wait(min(self.max_wait, delay))
        res.failure = "stopped"
        return res

    def label(self, items):
        """items: iterable of (key, query, document, kind); yields [(key, Result), ...] in completion order."""
        items = iter(items)
        self.stop.clear()
        with ThreadPoolExecutor(self.inflight) as pool:
            pending = {}

            def fill():
                while len(pending) < 2 * self.inflight:
                    try:
                        key, q, d, _ = next(items)
                    except StopIteration:
                        return
                    pending[pool.submit(self._one, prompts.rerank_messages(q, d, self.fmt))] = key
            try:
                fill()
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    batch = [(pending.pop(f), f.result()) for f in done]  # f.result() re-raises TeacherFatal
                    # cut short by another request's fatal error: no outcome, the pair stays pending
                    batch = [(k, r) for k, r in batch if r.failure != "stopped"]
                    fill()  # refill before the caller's (slow) write
                    yield batch
            finally:
                self.stop.set()  # on fatal/close: in-flight retries give up at once
                for f in pending:
                    f.cancel()


class LocalTeacher:
    """Greedy labels from any model `minirank.load` accepts, continuous-batched by `minirank.generate`.
    Greedy decoding is deterministic, so an unparseable answer is recorded at once (no retries)."""

    def __init__(self, spec: str, fmt: str = "explain", batch_size: int = 16, max_new_tokens: int = 1024,
                 dtype: str = "float32", device: str = "cpu"):
        import torch

        import minirank
        from .hub import HubError
        try:
            self.model, self.tok = minirank.load(spec, dtype=getattr(torch, dtype), device=device)
        except (OSError, ValueError, HubError) as e:  # CheckpointError and GGUFError are ValueErrors
            raise TeacherFatal(f"cannot load teacher model {spec!r}: {e}") from None
        self.name, self.fmt, self.batch_size, self.max_new_tokens = spec, fmt, batch_size, max_new_tokens

    def label(self, items):
        import minirank
        items = iter(items)
        chunk = 4 * self.batch_size  # results are written after each chunk: the resume granularity
        while True:
            batch = [x for _, x in zip(range(chunk), items)]
            if not batch:
                return
            ids = [prompts.prompt_ids(self.tok, q, d, self.fmt) for _, q, d, _ in batch]
            out = minirank.generate(self.model, ids, max_new_tokens=self.max_new_tokens, temperature=0.0,
                                    stop_strings=[prompts.STOP], tokenizer=self.tok, batch_size=self.batch_size)
            results = []
            for (key, *_), p, toks, text, why in zip(batch, ids, out.tokens, out.texts, out.finish_reasons):
                res = Result(text=text, attempts=1,
                             usage={"prompt_tokens": len(p), "completion_tokens": len(toks)})
                res.label, res.explanation = split_answer(text, self.fmt)
                if res.label is None:
                    res.failure = "unparseable"
                    res.detail = ("hit max_new_tokens; " if why == "length" else "") + text[-200:]
                results.append((key, res))
            yield results


class StructureTeacher:
    """No model: labels from the dump's structure, for offline data when no real teacher is at hand.
    The question's accepted answer -> 2, its other answers -> 1, the BM25 negative (another
    question's answer) -> 0; explanations are one fixed sentence per kind. Only meaningful with
    --documents answers. Weak labels (an unaccepted answer can be the best one; a negative can be
    relevant), and the explanations teach a template, not reasoning: plumbing and learning-curve
    checks, not a replacement for a teacher."""

    name = "structure"
    LABELS = {"accepted": 2, "answer": 1, "negative": 0}
    WHY = {"accepted": "The document is the answer the asker accepted: it addresses the question directly.",
           "answer": "The document answers this question, but it is not the accepted answer, so it may "
                     "cover only part of what was asked.",
           "negative": "The document shares words with the question but answers a different question."}

    def __init__(self, fmt: str = "explain"):
        self.fmt = fmt

    def label(self, items):
        out = []
        for key, _, _, kind in items:
            if kind not in self.LABELS:
                raise TeacherFatal(f"--teacher structure labels answers only (got a {kind!r} document): "
                                   f"use --documents answers")
            why = "" if self.fmt == "label" else self.WHY[kind]
            out.append((key, Result(text=prompts.format_target(why, self.LABELS[kind], self.fmt),
                                    label=self.LABELS[kind], explanation=why, attempts=0)))
            if len(out) == 256:
                yield out
                out = []
        if out:
            yield out
