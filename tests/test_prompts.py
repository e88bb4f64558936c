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
