"""The one prompt module: both formats, the SFT target with its end-of-turn token, and agreement with
transformers' own chat rendering of the same conversation."""

import pytest

from minirank import prompts


def test_formats_and_labels():
    assert prompts.format_target("  Explains X. ", 2) == "Explains X.\n\nRelevance Label: 2 ##"
    assert prompts.format_target("ignored", 1, "label") == "Relevance Label: 1 ##"
    for fmt in prompts.FORMATS:
        for label in prompts.LABELS:
            assert prompts.parse_label(prompts.format_target("Because.", label, fmt)) == label
    with pytest.raises(ValueError, match="unknown format"):
        prompts.rerank_messages("q", "d", "score")
    with pytest.raises(ValueError, match="label must be"):
        prompts.format_target("x", 3, "label")
    explain, label = (prompts.rerank_messages("q?", "doc", f)[0]["content"] for f in ("explain", "label"))
    assert "explain" in explain and "explain" not in label and label.endswith("Question:\nq?\n\nDocument:\ndoc")
    assert prompts.prompt_hash("explain") != prompts.prompt_hash("label")


def test_prompt_and_target_ids_match_transformers(smol_dir):
    from transformers import AutoTokenizer

    from minirank.tokenizer import Tokenizer

    tok, ref = Tokenizer.from_dir(smol_dir), AutoTokenizer.from_pretrained(smol_dir)
    q, d, expl = "Why does my espresso taste sour?", "Under-extraction: grind finer. " * 5, "It names the cause."
    for fmt in prompts.FORMATS:
        ids = prompts.prompt_ids(tok, q, d, fmt)
        assert ids == ref.apply_chat_template(prompts.rerank_messages(q, d, fmt), add_generation_prompt=True, return_dict=False)
        target = prompts.completion_ids(tok, expl, 2, fmt)
        # transformers' rendering of the finished conversation starts with exactly prompt + target,
        # the target's last token being the end-of-turn marker the template writes after an answer
        done = prompts.rerank_messages(q, d, fmt) + [
            {"role": "assistant", "content": prompts.format_target(expl, 2, fmt)}]
        full = ref.apply_chat_template(done, return_dict=False)
        assert full[:len(ids) + len(target)] == ids + target
        assert target[-1] == ref.convert_tokens_to_ids("<|im_end|>") == prompts.end_of_turn_id(tok)
        assert target[-1] in tok.stop_ids


def test_max_tokens_keeps_the_longest_document_prefix_that_fits(smol_dir):
    from minirank.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smol_dir)
    q, d = "Why does my espresso taste sour?", "Under-extraction means too little is dissolved: grind finer. " * 20
    full = prompts.prompt_ids(tok, q, d, "label")
    assert prompts.prompt_ids(tok, q, d, "label", max_tokens=len(full)) == full  # fits: untouched
    empty = len(prompts.prompt_ids(tok, q, "", "label"))
    cap = (empty + len(full)) // 2
    cut = prompts.prompt_ids(tok, q, d, "label", max_tokens=cap)
    k = next(k for k in range(len(d), -1, -1) if prompts.prompt_ids(tok, q, d[:k], "label") == cut)
    assert len(cut) <= cap < len(prompts.prompt_ids(tok, q, d[:k + 1], "label"))  # one more character: too long
    with pytest.raises(ValueError, match="empty document"):
        prompts.prompt_ids(tok, q, d, "label", max_tokens=empty - 1)
