"""Token ids, decoding and chat templates equal transformers' for the same tokenizer files."""

import json
import shutil

import pytest

from minirank.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; pi = 3.14159, 1,000,000 and 007.",
    "runs   of    spaces\tand\ttabs  \n\n\nnew\r\nlines   ",
    "caf\u00e9 vs cafe\u0301 (composed and decomposed), na\u00efve, \u00c5ngstr\u00f6m",
    "\u4e2d\u6587\u5206\u8bcd\u6d4b\u8bd5\uff0c\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\ud55c\uad6d\uc5b4",
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f1eb\U0001f1f7 \u2764\ufe0f",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|endoftext|>",
    "code: def f(x):\n    return x**2  # comment\n",
    "   leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def pair(smol_dir):
    return Tokenizer.from_dir(smol_dir), transformers.AutoTokenizer.from_pretrained(smol_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2=?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "caf\u00e9 \U0001f600 \u4e2d\u6587  x"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_apply_chat_template(pair, messages, gen):
    ours, ref = pair
    want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ours.chat(messages, add_generation_prompt=gen) == list(want)
    assert ours.render_chat(messages, gen) == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


# A Llama-3-style template exercising what real templates use: strftime_now for today's date,
# raise_exception, tojson, loop controls, whitespace control via trim_blocks/lstrip_blocks.
TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if loop.index0 > 5 %}{% break %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'system' %}Today: {{ date_string }} {{ {"tools": ["caf\u00e9", 1]} | tojson }}
{% endif %}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def custom_pair(smol_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    for f in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(smol_dir / f, d / f)
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


def test_template_features_match(custom_pair):
    ours, ref = custom_pair
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "  hi \u00e9  "}]
    for kwargs in ({}, {"date_string": "26 Jul 2024"}):  # today's date, then a fixed one
        want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.render_chat(msgs, True, **kwargs) == want
    assert "26 Jul 2024" in ours.render_chat(msgs, True, date_string="26 Jul 2024")
    with pytest.raises(Exception, match="unknown role tool"):
        ours.chat([{"role": "tool", "content": "x"}])


def test_special_ids_and_stop_ids(pair):
    ours, ref = pair
    assert len(ours) == len(ref)
    assert ours.eos_id == ref.eos_token_id and ours.bos_id == ref.bos_token_id
    assert ours.token_id("<|im_end|>") in ours.stop_ids


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        Tokenizer.from_dir(tmp_path)
