"""Assistant-only masking, token by token, on the embedded tokenizer and a Qwen2-style template."""

import pytest

from personatune.data.chat import FALLBACK_TEMPLATE, render_chat, render_prompt, render_text

# A Qwen2.5-style ChatML template, written for this test: default system prompt, no
# generation markers, <|im_end|> ends each turn.
QWEN2_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CONV = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hello there, who are you?"},
    {"role": "assistant", "content": "Arr, I be Saltbeard!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four, matey."},
]


@pytest.fixture(params=["embedded", "qwen2"])
def tok(request, embedded_tokenizer):
    import copy

    t = copy.deepcopy(embedded_tokenizer)
    if request.param == "qwen2":
        t.chat_template = QWEN2_STYLE
    return t


def trained_text(tok, r):
    return [tok.decode([i]) for i, m in zip(r.input_ids, r.mask) if m]


def test_mask_is_exactly_assistant_content_and_end_of_turn(tok):
    """Guards against training on the prompt, the role header, or missing the <|im_end|>."""
    r = render_chat(tok, CONV)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for content in ("Arr, I be Saltbeard!", "Four, matey."):
        expected += tok(content, add_special_tokens=False)["input_ids"] + [im_end]
    assert [i for i, m in zip(r.input_ids, r.mask) if m] == expected
    # Token by token: every trained token sits inside an assistant turn.
    text = "".join(trained_text(tok, r))
    assert text == "Arr, I be Saltbeard!<|im_end|>Four, matey.<|im_end|>"
    # The newline after <|im_end|> and the next turn's header are not trained.
    pos = [k for k, m in enumerate(r.mask) if m]
    after_first = pos[len(tok("Arr, I be Saltbeard!", add_special_tokens=False)["input_ids"])] + 1
    assert not r.mask[after_first]


def test_ids_equal_the_inference_tokenisation(tok):
    """Guards against segment-wise tokenisation that differs from what generation sees."""
    r = render_chat(tok, CONV)
    full = tok.apply_chat_template(CONV, tokenize=False)
    assert r.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    prompt = render_prompt(tok, CONV[:2])
    assert full.startswith(prompt)


def test_qwen2_default_system_prompt_not_trained(embedded_tokenizer):
    import copy

    t = copy.deepcopy(embedded_tokenizer)
    t.chat_template = QWEN2_STYLE
    r = render_chat(t, CONV[1:3])
    assert "".join(trained_text(t, r)) == "Arr, I be Saltbeard!<|im_end|>"
    assert "You are Qwen" in t.decode(r.input_ids)


def test_fallback_template_ends_turns_with_eos(embedded_tokenizer):
    """Models without a template (Falcon, Phi-2) must learn to emit EOS, which stops generate."""
    import copy

    t = copy.deepcopy(embedded_tokenizer)
    t.chat_template = FALLBACK_TEMPLATE
    r = render_chat(t, CONV)
    trained = [i for i, m in zip(r.input_ids, r.mask) if m]
    assert trained.count(t.eos_token_id) == 2 and trained[-1] == t.eos_token_id
    assert "### Assistant:" not in "".join(trained_text(t, r))


def test_truncation_and_text_mode(embedded_tokenizer):
    r = render_chat(embedded_tokenizer, CONV, max_length=10)
    assert r.truncated and len(r.input_ids) == 10
    t = render_text(embedded_tokenizer, "It was a dark night.")
    assert all(t.mask) and t.input_ids[-1] == embedded_tokenizer.eos_token_id
    assert r.labels[:3] == [-100, -100, -100]
