"""Tokenizer and chat format: the `tokenizers` library plus the model's own Jinja chat template.

Ids equal transformers' tokenizer and `apply_chat_template` for the same files: we render the
template with the same Jinja settings transformers uses (trim_blocks, lstrip_blocks, a sandbox,
`raise_exception`, `strftime_now`, its `tojson`) and encode the rendered text without adding
special tokens, exactly as transformers does.
"""

import json
import shutil
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# end-of-turn markers of the chat formats we support; generation also stops on these when present
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")


def _token_str(value) -> str | None:
    # tokenizer_config.json stores special tokens either as "<s>" or as {"content": "<s>", ...}
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None,
                 generation_config: dict | None = None, source: Path | None = None):
        self.tk = tokenizer
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.source = source
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # the named-templates form: take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.special_tokens = {k: _token_str(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self.token_id(self.special_tokens["bos_token"])
        self.eos_id = self.token_id(self.special_tokens["eos_token"])
        self.pad_id = self.token_id(self.special_tokens["pad_token"])
        self.stop_ids = self._stop_ids()

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (minirank needs a fast-tokenizer file)")

        def read(name):
            f = path / name
            if not f.is_file():
                return {}
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: invalid JSON ({e})") from None

        config = read("tokenizer_config.json")
        for k, v in read("special_tokens_map.json").items():
            config.setdefault(k, v)
        if "chat_template" not in config and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), config, read("generation_config.json"), path)

    def __len__(self) -> int:
        """Number of real tokens (incl. added ones); embedding rows past this are never sampled."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Like transformers' `tokenizer.encode(text)`: special tokens (e.g. Llama's BOS) are added
        when the tokenizer's post-processor says so; pass False for pieces you concatenate."""
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces", False):
            text = clean_up_tokenization(text)
        return text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    documents: list[dict] | None = None, **kwargs) -> str:
        """The chat template's text. tools: JSON-schema dicts; other keyword arguments become template
        variables (date_string, builtin_tools, Qwen3's enable_thinking, ...). Like transformers, `tools`
        and `documents` are always defined for the template (None when not given), so `tools is defined`
        reads the same in both."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.source or ''} has no chat_template (tokenizer_config.json)")
        for t in tools or []:
            if not isinstance(t, dict):
                raise TypeError(f"tools must be JSON-schema dicts, got {type(t).__name__}")
        return _compile(self.chat_template).render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of `messages` in the model's chat format (= transformers' apply_chat_template)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def _stop_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        ids.append(self.eos_id)
        added = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        ids += [self.token_id(t) for t in END_OF_TURN if t in added]
        return sorted({i for i in ids if i is not None})

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        if self.source is not None and (self.source / "special_tokens_map.json").is_file() and self.source != out:
            shutil.copyfile(self.source / "special_tokens_map.json", out / "special_tokens_map.json")


def clean_up_tokenization(text: str) -> str:
    # transformers' legacy decode clean-up, applied when tokenizer_config.json asks for it (Llama 3 does)
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


_TEMPLATES: dict = {}


def _compile(source: str):
    if source not in _TEMPLATES:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' tojson: no HTML escaping, unicode kept (jinja's built-in escapes both)
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
