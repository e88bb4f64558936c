"""The real Llama-3.2-3B-Instruct, Llama-3.1-8B-Instruct and Qwen2.5-7B-Instruct chat templates
(../shared/chat-templates) and Qwen3's (fixtures/chat-templates, with enable_thinking): rendered text
and ids equal transformers' `apply_chat_template`.

The real tokenizers are not available offline, so each test tokenizer is SmolLM2's byte-level BPE
with the family's special tokens added and, for Llama 3, Llama 3's post-processor (it prepends
<|begin_of_text|> on encode). That is what the chat path depends on: the template writes the BOS
itself, so encoding the rendered text must not add a second one.
"""

import json
from datetime import datetime
from pathlib import Path

import pytest

import minirank.tokenizer
from minirank import prompts
from minirank.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "chat-templates"
LLAMA32 = "meta-llama-Llama-3.2-3B-Instruct.jinja"
LLAMA31 = "meta-llama-Llama-3.1-8B-Instruct.jinja"
QWEN25 = "Qwen-Qwen2.5-7B-Instruct.jinja"
QWEN3 = Path(__file__).resolve().parent / "fixtures" / "chat-templates" / "Qwen-Qwen3-0.6B.jinja"  # see SOURCES.md

LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


def template(name) -> str:
    f = TEMPLATES / name
    if not f.is_file():
        pytest.skip(f"chat template absent: {f}")
    return f.read_text()


def build(out: Path, base: Path, family: str, chat_template: str) -> Path:
    """A tokenizer directory of one family's shape, from SmolLM2's tokenizer.json."""
    from tokenizers import AddedToken, processors
    tk = tokenizers.Tokenizer.from_file(str(base / "tokenizer.json"))
    if family == "llama":
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL])
        bos = tk.token_to_id("<|begin_of_text|>")
        # Llama 3's tokenizer.json: ByteLevel, then a template that prepends <|begin_of_text|>
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        config = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", clean_up_tokenization_spaces=True)
    else:  # Qwen2.5/3: no BOS at all; <|endoftext|> pads; tags are plain added tokens (Qwen3 adds think/tool_response)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
        tags = ["<tool_call>", "</tool_call>"]
        if family == "qwen3":
            tags += ["<tool_response>", "</tool_response>", "<think>", "</think>"]
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
        config = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                      clean_up_tokenization_spaces=False)
    out.mkdir(parents=True)
    tk.save(str(out / "tokenizer.json"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=131072, chat_template=chat_template)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=[LLAMA32, LLAMA31, QWEN25])
def pair(request, smol_dir, tmp_path_factory):
    name = request.param
    family = "qwen" if name == QWEN25 else "llama"
    d = build(tmp_path_factory.mktemp("tok") / family, smol_dir, family, template(name))
    return name, Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Z\u00fcrich"}},
                   "required": ["city"]}}}
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "get_weather", "arguments": {"city": "Z\u00fcrich"}}}]}
RESULT = {"role": "tool", "content": "12 \u00b0C, rain"}

CHATS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system, multi-turn": [
        {"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "2+2=?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "caf\u00e9 \U0001f600 \u4e2d\u6587  x\n"}],
    "ends with assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! <b>&</b>"}],
    "tool call and result": [{"role": "user", "content": "Weather in Z\u00fcrich?"}, CALL, RESULT],
}
VARIANTS = [  # template variables; Llama 3.2 without date_string writes today's date (both sides: same day)
    {},
    {"date_string": "03 Feb 2025"},
    {"tools": [WEATHER]},
    {"tools": [WEATHER], "date_string": "03 Feb 2025", "tools_in_user_message": False},
    {"builtin_tools": ["brave_search", "wolfram_alpha"]},  # Llama 3.1 only: ipython mode
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
def test_render_and_ids_equal_apply_chat_template(pair, chat, gen):
    name, ours, ref = pair
    messages = CHATS[chat]
    for kw in VARIANTS:
        if "builtin_tools" in kw and name != LLAMA31:
            continue
        want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kw)
        assert ours.render_chat(messages, gen, **kw) == want, (name, chat, kw)
        ids = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False, **kw)
        assert ours.chat(messages, gen, **kw) == list(ids), (name, chat, kw)


def test_bos_written_once(pair):
    name, ours, ref = pair
    messages = CHATS["user"]
    ids = ours.chat(messages)
    assert ours.encode("hi") == ref.encode("hi")  # the post-processor is honoured on plain text
    if name == QWEN25:
        assert ours.bos_id is None and ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
        return
    bos = ours.token_id("<|begin_of_text|>")
    assert ours.bos_id == ref.bos_token_id == bos
    assert ours.encode("hi")[0] == bos  # encode adds it ...
    assert ids[0] == bos and ids.count(bos) == 1  # ... but the chat ids carry only the template's
    # (SmolLM2's own <|im_end|>/<|endoftext|> are still in this hybrid vocabulary, hence a subset test)
    assert {ours.token_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")} <= set(ours.stop_ids)


def test_tools_need_a_user_message(pair):
    name, ours, ref = pair
    if name == QWEN25:
        pytest.skip("Qwen2.5 puts tools in the system message")
    with pytest.raises(Exception, match="no first user message"):
        ours.render_chat([{"role": "system", "content": "s"}], tools=[WEATHER])


class _Day:
    """Stands in for `datetime` in minirank.tokenizer: now() is a chosen day."""

    def __init__(self, day):
        self.day = day

    def now(self):
        return self.day


def test_llama32_prompt_ids_do_not_depend_on_the_date(pair, monkeypatch):
    name, ours, _ = pair
    if name != LLAMA32:
        pytest.skip("only Llama 3.2's template reads today's date")
    messages = prompts.rerank_messages("q", "d")
    seen = []
    for day in (datetime(2025, 1, 2), datetime(2026, 11, 27)):
        monkeypatch.setattr(minirank.tokenizer, "datetime", _Day(day))
        seen.append((prompts.prompt_ids(ours, "q", "d"), ours.chat(messages)))
    (pinned_a, plain_a), (pinned_b, plain_b) = seen
    assert pinned_a == pinned_b  # prompts pins the date (CHAT_VARS) ...
    assert plain_a != plain_b  # ... and without it the template really does write today's date
    assert "Today Date: 26 Jul 2024" in ours.decode(pinned_a)
    assert "Today Date: 02 Jan 2025" in ours.decode(plain_a)


def test_tools_and_documents_always_defined(smol_dir, tmp_path):
    # transformers passes tools=None and documents=None when none are given: `is defined` is true
    probe = "{{ tools is defined }} {{ tools is none }} {{ documents is defined }} {{ messages | length }}"
    d = build(tmp_path / "probe", smol_dir, "qwen", probe)
    ours, ref = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    msgs = CHATS["user"]
    for kw in ({}, {"tools": [WEATHER]}):
        assert ours.render_chat(msgs, **kw) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    assert ours.render_chat(msgs) == "True True True 1"
    with pytest.raises(TypeError, match="tools must be JSON-schema dicts"):
        ours.render_chat(msgs, tools=[len])


# --- Qwen3: thinking on by default, enable_thinking=False closes an empty <think> block ---------------

@pytest.fixture(scope="module")
def qwen3(smol_dir, tmp_path_factory):
    d = build(tmp_path_factory.mktemp("tok") / "qwen3", smol_dir, "qwen3", QWEN3.read_text())
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


CALL3 = {**CALL, "content": ""}  # Qwen3's template reads every assistant message's content
QWEN3_CHATS = {
    **CHATS,
    "tool call and result": [{"role": "user", "content": "Weather in Z\u00fcrich?"}, CALL3, RESULT],
    # earlier turns' reasoning is dropped, the last assistant turn after the last query keeps it
    "reasoning in content": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}],
    "reasoning_content field": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}],
    "tool result then answer": [{"role": "user", "content": "Weather in Z\u00fcrich?"}, CALL3, RESULT,
                                {"role": "assistant", "content": "<think>rain</think>It rains."}],
}


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", list(QWEN3_CHATS))
def test_qwen3_render_and_ids_equal_apply_chat_template(qwen3, chat, gen):
    ours, ref = qwen3
    messages = QWEN3_CHATS[chat]
    for kw in ({}, {"enable_thinking": True}, {"enable_thinking": False}, {"tools": [WEATHER], "enable_thinking": False}):
        want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kw)
        assert ours.render_chat(messages, gen, **kw) == want, (chat, kw)
        ids = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False, **kw)
        assert ours.chat(messages, gen, **kw) == list(ids), (chat, kw)


def test_qwen3_enable_thinking_reaches_the_template(qwen3):
    ours, _ = qwen3
    msgs = CHATS["user"]
    think, plain = ours.render_chat(msgs), ours.render_chat(msgs, enable_thinking=False)
    assert think.endswith("<|im_start|>assistant\n") and ours.render_chat(msgs, enable_thinking=True) == think
    assert plain == think + "<think>\n\n</think>\n\n"
    # the empty block is four tokens: <think>, the blank line, </think>, the blank line
    extra = ours.chat(msgs, enable_thinking=False)[len(ours.chat(msgs)):]
    assert [ours.decode([i]) for i in extra] == ["<think>", "\n\n", "</think>", "\n\n"]
    # the reranking prompt turns thinking off: the judge explains in its answer, not in a <think> block
    assert ours.decode(prompts.prompt_ids(ours, "q", "d")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
