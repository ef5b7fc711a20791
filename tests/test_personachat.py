"""Persona-Chat in both schemas, rendered through prepare_data; the Llama-2 [INST] template;
and the fallback template's end-of-turn token stopping generation (Falcon-7B, Phi-2)."""

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

from personatune.config import load_spec
from personatune.data.chat import (
    FALLBACK_TEMPLATE,
    ensure_chat_template,
    render_chat,
    render_prompt,
)
from personatune.data.dataset import load_examples, prepare_data

FIXTURES = Path(__file__).parent / "fixtures"
RECIPES = Path(__file__).parents[1] / "recipes"

# Llama-2's chat template as in meta-llama/Llama-2-7b-chat-hf's tokenizer config, written
# out here (no Hub access) to check the recipe's copy and masking under it.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def spec_for(tmp_path, fixture: str, extra: str = ""):
    """A persona spec over one fixture file, nothing held out."""
    path = tmp_path / "persona.yaml"
    path.write_text(
        f"name: pc\ndata:\n  - path: {FIXTURES / fixture}\n    format: personachat\n"
        f"train:\n  eval_split: 0\n  max_seq_length: 512\n{extra}"
    )
    return load_spec(path)


def trained_segments(tok, row) -> list[str]:
    """The decoded runs of consecutive trained tokens of a prepared row."""
    segs, cur = [], []
    for i, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            cur.append(i)
        elif cur:
            segs.append(tok.decode(cur))
            cur = []
    if cur:
        segs.append(tok.decode(cur))
    return segs


def check_rows(tok, spec, eot: str):
    """Facts in the system prompt and untrained; every persona turn trained, with its
    end-of-turn token; every partner turn present and untrained."""
    data = prepare_data(spec, tok)
    examples = [e for exs, _ in load_examples(spec) for e in exs]
    assert len(data.train) == len(examples) == 3
    for row, ex in zip(data.train, examples):
        text = tok.decode(row["input_ids"])
        segs = trained_segments(tok, row)
        for fact in ex.persona_facts:
            assert f"- {fact}" in text
            assert not any(fact in s for s in segs)
        persona = [m["content"] for m in ex.messages if m["role"] == "assistant"]
        partner = [m["content"] for m in ex.messages if m["role"] == "user"]
        assert [s.strip() for s in segs] == [(c + eot).strip() for c in persona]
        for line in partner:
            assert line in text and not any(line in s for s in segs)
    return examples


def test_parlai_schema_facts_history_and_mask(tmp_path, embedded_tokenizer):
    """Guards against dropping persona facts, losing earlier turns of the history, or
    training on the partner's turns (ParlAI / Hugging Face schema)."""
    spec = spec_for(tmp_path, "personachat_parlai.jsonl")
    examples = check_rows(embedded_tokenizer, spec, "<|im_end|>")
    first = examples[0]
    assert first.persona_facts[0] == "i keep bees on my roof."
    # Whole history kept: 2 partner and 2 persona turns (the persona's opening line
    # after "__ SILENCE __" cannot open a chat and is dropped).
    assert [m["role"] for m in first.messages] == ["user", "assistant"] * 2
    assert (
        first.messages[-1]["content"]
        == "i look after my bees on the roof . they make great honey ."
    )
    assert all(m["content"] != "__ SILENCE __" for e in examples for m in e.messages)


def test_cynaptics_flavour_facts_history_and_mask(tmp_path, embedded_tokenizer):
    """Guards against losing persona B's facts (list or one string), the dialogue lines, or
    the reference reply, and against training on persona A (Cynaptics flavour)."""
    spec = spec_for(tmp_path, "personachat_cynaptics.jsonl")
    examples = check_rows(embedded_tokenizer, spec, "<|im_end|>")
    assert examples[1].persona_facts == ["I teach chemistry.", "I live on a houseboat."]
    assert [m["role"] for m in examples[1].messages] == ["user", "assistant"] * 3
    assert examples[1].messages[-1]["content"] == "I teach chemistry at the high school."
    assert examples[0].messages[0]["content"] == "Hi! What do you do for a living?"


def test_llama2_inst_template_masks_persona_turns(tmp_path, embedded_tokenizer):
    """Guards against the Llama-2 recipe losing the [INST] format, or a mask that trains
    the [INST] prompt or <<SYS>> facts instead of persona B's replies and their EOS."""
    recipe = load_spec(RECIPES / "llama-2-7b-chat-persona-chat.yaml")
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = LLAMA2_TEMPLATE
    ensure_chat_template(tok, None)  # a tokenizer that has the template keeps it
    assert tok.chat_template == LLAMA2_TEMPLATE
    conv = [
        {"role": "system", "content": "Your persona:\n- I am a chef."},
        {"role": "user", "content": "What do you do?"},
        {"role": "assistant", "content": "I cook."},
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "Pasta, mostly."},
    ]
    ours = copy.deepcopy(embedded_tokenizer)
    ensure_chat_template(ours, recipe.model.chat_template)
    text = ours.apply_chat_template(conv, tokenize=False)
    assert text == tok.apply_chat_template(conv, tokenize=False)  # recipe copy == Llama-2's
    assert text.startswith("<|im_start|>[INST] <<SYS>>\nYour persona:\n- I am a chef.\n<</SYS>>")
    # Through prepare_data with the recipe's template: only persona B's turns are trained.
    spec = spec_for(tmp_path, "personachat_cynaptics.jsonl")
    spec.model.chat_template = recipe.model.chat_template
    ensure_chat_template(ours, spec.model.chat_template)
    check_rows(ours, spec, " <|im_end|>")
    r = render_chat(ours, conv)
    assert ours(text, add_special_tokens=False)["input_ids"] == r.input_ids
    assert text.startswith(render_prompt(ours, conv[:2]))


@pytest.fixture(scope="module", params=["falcon", "phi"])
def no_template_model(request, tmp_path_factory, embedded_tokenizer):
    """A tiny random Falcon or Phi whose tokenizer has no chat template, like the real ones."""
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = None
    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param) / "m", tok)
    return request.param, path


def test_fallback_end_of_turn_stops_generation(no_template_model):
    """Guards against a fallback template whose end-of-turn token is not the one generate
    stops at: the model would run on into a made-up "### User:" turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personatune.engine import generate_answers

    arch, path = no_template_model
    recipe = {"falcon": "falcon-7b-persona-chat.yaml", "phi": "phi-2-alpaca.yaml"}[arch]
    tok = AutoTokenizer.from_pretrained(path)
    assert not tok.chat_template
    ensure_chat_template(tok, load_spec(RECIPES / recipe).model.chat_template)
    assert tok.chat_template == FALLBACK_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.generation_config.eos_token_id == tok.eos_token_id

    conv = [
        {"role": "user", "content": "Any pets?"},
        {"role": "assistant", "content": "Two cats, Salt and Pepper."},
        {"role": "user", "content": "Hobbies?"},
        {"role": "assistant", "content": "Old maps."},
    ]
    r = render_chat(tok, conv)
    start = r.mask.index(True)
    first_turn = r.input_ids[start : r.mask.index(False, start)]
    assert first_turn[-1] == tok.eos_token_id  # the trained end of turn is EOS
    # Script the model to emit what it was trained on: the first reply, its EOS, then the
    # rest of the rendered conversation ("\n\n### User:\nHobbies?...").
    script = r.input_ids[start:]
    calls = []

    def force(module, args, out):
        step = min(len(calls), len(script) - 1)
        calls.append(1)
        forced = torch.full_like(out, -1e4)
        forced[..., -1, script[step]] = 0.0
        return forced

    handle = model.lm_head.register_forward_hook(force)
    try:
        answer = generate_answers(model, tok, [conv[:1]], max_new_tokens=len(script) + 5)[0].text
    finally:
        handle.remove()
    assert answer == "Two cats, Salt and Pepper."
    assert len(calls) == len(first_turn)  # one forward per token, none after EOS
