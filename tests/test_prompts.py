import pytest

from verl_search_r3.prompts import (
    PromptTemplates,
    embed_prompt_ids,
    format_document,
    query_reasoning_messages,
    render_embed_prompt,
    render_generation_prompt,
)
from verl_search_r3.tokens import EMBED_TOKEN, embed_token_id


@pytest.mark.parametrize("kind", ["query", "document"])
def test_embed_prompt_ends_with_the_token(qwen_tokenizer, kind):
    text = render_embed_prompt(qwen_tokenizer, "wing flutter at supersonic speed", kind)
    assert text.endswith(EMBED_TOKEN)
    assert "wing flutter at supersonic speed" in text
    assert text.startswith("<|im_start|>system")  # rendered through the chat template
    ids = embed_prompt_ids(qwen_tokenizer, "wing flutter at supersonic speed", kind)
    assert ids[-1] == embed_token_id(qwen_tokenizer)
    assert ids.count(embed_token_id(qwen_tokenizer)) == 1


def test_query_and_document_prompts_differ(qwen_tokenizer):
    q = embed_prompt_ids(qwen_tokenizer, "same text", "query")
    d = embed_prompt_ids(qwen_tokenizer, "same text", "document")
    assert q != d


def test_truncation_keeps_the_token_and_the_budget(qwen_tokenizer):
    long = "boundary layer transition " * 400
    full = embed_prompt_ids(qwen_tokenizer, long, "document")
    cut = embed_prompt_ids(qwen_tokenizer, long, "document", max_length=64)
    assert len(full) > 64 and len(cut) == 64
    assert cut[-1] == embed_token_id(qwen_tokenizer)
    # only the content is cut: same prefix, same suffix
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    n_suffix = len(full) - max(i for i, t in enumerate(full) if t == im_end)  # from the user turn's end
    assert cut[-n_suffix:] == full[-n_suffix:]
    assert cut[:10] == full[:10]
    with pytest.raises(ValueError, match="no room"):
        embed_prompt_ids(qwen_tokenizer, long, "document", max_length=5)


def test_short_content_is_not_padded_or_changed(qwen_tokenizer):
    ids = embed_prompt_ids(qwen_tokenizer, "lift", "query", max_length=512)
    assert qwen_tokenizer.decode(ids) == render_embed_prompt(qwen_tokenizer, "lift", "query")


def test_reasoning_prompt_asks_for_the_token_and_opens_the_assistant_turn(qwen_tokenizer):
    msgs = query_reasoning_messages("what is a shock wave?")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert EMBED_TOKEN in msgs[0]["content"]
    text = render_generation_prompt(qwen_tokenizer, "what is a shock wave?")
    assert text.endswith("<|im_start|>assistant\n")


def test_templates_are_validated_and_configurable(qwen_tokenizer):
    with pytest.raises(ValueError, match="must contain"):
        PromptTemplates(embed_reply="no token here")
    t = PromptTemplates(document_system="Represent this paper.")
    assert "Represent this paper." in render_embed_prompt(qwen_tokenizer, "x", "document", t)
    with pytest.raises(ValueError, match="unknown prompt kind"):
        render_embed_prompt(qwen_tokenizer, "x", "passage")


def test_format_document():
    assert format_document("Title", "Body text.") == "Title Body text."
    assert format_document(None, " body ") == "body"
    assert format_document("", "body") == "body"
