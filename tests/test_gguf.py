"""personatune export --gguf: a GGUF that transformers (and llama.cpp) load back and that
answers like base + adapter, with the persona's chat template and stop tokens in its
metadata, a llama.cpp LoRA adapter, and an Ollama Modelfile whose Go template renders
what the chat template renders."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny
from test_serve import USER, train_tiny_personas
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from personatune.cli import app
from personatune.data.chat import with_system_prompt
from personatune.engine import encode, end_of_turn_ids, load_persona
from personatune.errors import PersonatuneError
from personatune.export.gguf_file import write_model_gguf
from personatune.export.modelfile import chat_frame

runner = CliRunner()
GO_RENDER = Path(__file__).parent / "gotemplate" / "main.go"

#: Largest |logit difference| allowed between the GGUF model and base + adapter. Measured
#: on the tiny llama (logits up to ~0.5, the adapter moves them by ~0.8): f32 2.4e-7,
#: f16 2.4e-4, q8_0 8.1e-3.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}
#: The same on the embedded model, whose adapter moves logits by up to 13: measured on
#: the 30-step pirate (benchmarks/results/gguf_speed.md) f16 0.036, q8_0 0.91.
EMBEDDED_TOLERANCE = {"f16": 0.1, "q8_0": 2.0}
#: Greedy tokens llama.cpp on the f16 GGUF must share with transformers base + adapter
#: before the first difference (measured on the pirate: 40 of 128 on average).
EMBEDDED_LLAMA_CPP_SHARED = 8


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, embedded_tokenizer) -> Path:
    return build_tiny("qwen2", tmp_path_factory.mktemp("tinyqwen") / "qwen2", embedded_tokenizer)


@pytest.fixture(scope="module")
def personas(tmp_path_factory, tiny_model, tiny_qwen) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "llama": train_tiny_personas(root / "llama", tiny_model, count=1)[0],
        "qwen2": train_tiny_personas(root / "qwen2", tiny_qwen, count=1)[0],
    }


def export(persona: Path, out: Path, *args: str) -> Path:
    result = runner.invoke(app, ["export", str(persona), "--gguf", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


def parse_modelfile(text: str) -> dict:
    """Read the instructions of an Ollama Modelfile (``\"\"\"`` strings over several
    lines, quoted ``PARAMETER`` values) into ``{"FROM": ..., "stop": [...], ...}``."""
    out: dict = {"stop": []}
    for m in re.finditer(r'^(\w+) (?:"""(.*?)"""|(.*?))$', text, flags=re.M | re.S):
        word, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if word == "PARAMETER":
            key, raw = value.split(" ", 1)
            out.setdefault(key, []).append(json.loads(raw))
        else:
            out[word] = value
    return out


def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def compare_with_persona(
    persona: Path, folder: Path, gguf_file: str, tolerance: float, greedy: bool = True
):
    """Load ``gguf_file`` with transformers and check it against base + adapter: same
    prompt token ids, logits within ``tolerance``, the same greedy answer, the adapter in
    (the base's logits are further away), and the chat template and end-of-turn tokens in
    the metadata."""
    p = load_persona(persona)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    conv = with_system_prompt(USER, p.spec.system_prompt)
    text = p.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    batch = p.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    assert torch.equal(tok(text, add_special_tokens=False, return_tensors="pt").input_ids,
                       batch.input_ids)  # fmt: skip
    with torch.inference_mode():
        got = model(**batch).logits
        want = p.model(**batch).logits
        with p.model.disable_adapter():
            base = p.model(**batch).logits
        eot = sorted(end_of_turn_ids(p.model, p.tokenizer))
        kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eot, pad_token_id=eot[0])
        answer = model.generate(**batch, **kw)
        expected = p.model.generate(**batch, **kw)
    diff = (got - want).abs().max().item()
    assert diff <= tolerance, diff
    assert (got - base).abs().max().item() > 5 * diff  # the adapter is merged in
    if greedy:
        assert torch.equal(answer, expected)

    meta = gguf_fields(folder / gguf_file)
    assert meta["tokenizer.chat_template"] == p.tokenizer.chat_template == tok.chat_template
    im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")  # ChatML's end of turn
    assert meta["tokenizer.ggml.eot_token_id"] == im_end
    assert meta["tokenizer.ggml.eos_token_id"] in eot
    assert meta["tokenizer.ggml.add_bos_token"] is False
    return p, eot


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_round_trip_llama(personas, tmp_path, quant):
    """Guards against a GGUF with wrong tensor names or Q/K row order, a tokenizer that
    splits the prompt differently, a lost chat template or end-of-turn token, or an
    adapter left out of the weights."""
    out = export(personas["llama"], tmp_path / "out", "--quant", quant)
    names = {f.name for f in out.iterdir()}
    assert names == {"alpha-" + quant + ".gguf", "Modelfile", "persona.json"}
    assert not list(tmp_path.glob(".out.partial*"))
    compare_with_persona(personas["llama"], out, f"alpha-{quant}.gguf", TOLERANCE[quant])
    assert gguf_fields(out / f"alpha-{quant}.gguf")["general.architecture"] == "llama"


def test_gguf_round_trip_qwen2(personas, tmp_path):
    """Guards against qwen2's Q/K/V biases or tensor names going wrong (no llama row
    permutation for qwen2)."""
    out = export(personas["qwen2"], tmp_path / "out", "--quant", "f32")
    compare_with_persona(personas["qwen2"], out, "alpha-f32.gguf", TOLERANCE["f32"])
    assert gguf_fields(out / "alpha-f32.gguf")["general.architecture"] == "qwen2"


def go_render(template: str, messages: list[dict]) -> str:
    result = subprocess.run(
        ["go", "run", str(GO_RENDER)],
        input=json.dumps({"template": template, "messages": messages}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_modelfile(persona: Path, folder: Path) -> None:
    """Parse the Modelfile back and render its TEMPLATE with Go's text/template against
    the persona's chat template."""
    p = load_persona(persona)
    mf = parse_modelfile((folder / "Modelfile").read_text())
    assert (folder / mf["FROM"]).is_file()
    assert mf["SYSTEM"] == p.spec.system_prompt
    eot = end_of_turn_ids(p.model, p.tokenizer)
    assert sorted(mf["stop"]) == sorted(p.tokenizer.convert_ids_to_tokens(list(eot)))
    assert mf["stop"][0] == "<|im_end|>"
    two_turns = with_system_prompt(
        [*USER, {"role": "assistant", "content": "Arr, 4."}, {"role": "user", "content": "And 5?"}],
        p.spec.system_prompt,
    )
    for conv in (two_turns, USER):  # with the persona's system prompt; with none
        want = p.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert go_render(mf["TEMPLATE"], conv) == want


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go)")
def test_modelfile_template_renders_like_the_chat_template(personas, tmp_path):
    """Guards against an Ollama TEMPLATE that differs from the chat template the persona
    was trained with (the usual cause of garbage or endless output after an export), a
    missing SYSTEM prompt, or stop strings that are not the end-of-turn tokens."""
    out = export(personas["llama"], tmp_path / "out", "--quant", "f16")
    check_modelfile(personas["llama"], out)


@pytest.mark.parametrize("scaling", ["alpha/r", "rslora"])
def test_lora_gguf_is_base_plus_adapter(personas, tmp_path, scaling):
    """Guards against a LoRA GGUF whose names, alpha or B row order (llama's Q/K
    permutation) do not rebuild the merged weights on the base GGUF, that lacks the
    adapter metadata llama.cpp's --lora reads, or that scales an rsLoRA adapter
    (alpha/sqrt(r)) by llama.cpp's alpha/r."""
    import gguf

    persona = personas["llama"]
    if scaling == "rslora":
        persona = Path(shutil.copytree(persona, tmp_path / "rslora"))
        cfg = json.loads((persona / "adapter_config.json").read_text())
        (persona / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    merged = export(persona, tmp_path / "merged", "--quant", "f32")
    out = export(persona, tmp_path / "lora", "--quant", "f32", "--lora-gguf")
    assert {f.name for f in out.iterdir()} >= {"base-f32.gguf", "alpha-lora-f32.gguf"}
    meta = gguf_fields(out / "alpha-lora-f32.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    alpha = meta["adapter.lora.alpha"]
    assert alpha == json.loads((persona / "adapter_config.json").read_text())["lora_alpha"]
    mf = parse_modelfile((out / "Modelfile").read_text())
    assert mf["FROM"] == "./base-f32.gguf" and mf["ADAPTER"] == "./alpha-lora-f32.gguf"

    def tensors(path):
        return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}

    base, lora, want = (tensors(out / "base-f32.gguf"), tensors(out / "alpha-lora-f32.gguf"),
                        tensors(merged / "alpha-f32.gguf"))  # fmt: skip
    adapted = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert len(adapted) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for name, w in want.items():
        rebuilt = base[name]
        if name in adapted:
            a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
            rebuilt = rebuilt + alpha / a.shape[0] * (b @ a)  # llama.cpp: W + alpha/r B A
        np.testing.assert_allclose(rebuilt, w, atol=1e-5)


def test_lora_gguf_runs_in_llama_cpp(personas, tmp_path):
    """Guards against a LoRA GGUF that llama.cpp refuses or applies wrongly: the base GGUF
    with the adapter gives the merged GGUF's logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (extra llama-cpp)")
    persona = personas["llama"]
    merged = export(persona, tmp_path / "merged", "--quant", "f32")
    out = export(persona, tmp_path / "lora", "--quant", "f32", "--lora-gguf")
    p = load_persona(persona)
    text = p.tokenizer.apply_chat_template(
        with_system_prompt(USER, p.spec.system_prompt), tokenize=False, add_generation_prompt=True
    )
    ids = p.tokenizer(text, add_special_tokens=False)["input_ids"]

    def last_logits(**kw):
        llm = llama_cpp.Llama(n_ctx=256, n_threads=1, logits_all=True, verbose=False, **kw)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1])

    with_lora = last_logits(model_path=str(out / "base-f32.gguf"),
                            lora_path=str(out / "alpha-lora-f32.gguf"))  # fmt: skip
    merged_logits = last_logits(model_path=str(merged / "alpha-f32.gguf"))
    base_logits = last_logits(model_path=str(out / "base-f32.gguf"))
    with torch.inference_mode():
        want = p.model(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(merged_logits, want, atol=1e-3)
    np.testing.assert_allclose(with_lora, want, atol=1e-3)
    assert np.abs(base_logits - want).max() > 1e-2


def test_export_gguf_refuses_clearly(personas, tmp_path, monkeypatch, embedded_tokenizer):
    """Guards against tracebacks or half-written folders for an unknown quant, a llama.cpp
    quant without llama-cpp-python, an existing folder, or an architecture llama.cpp's
    names are not written for here."""
    persona = personas["llama"]
    result = runner.invoke(app, ["export", str(persona), "--gguf", str(tmp_path / "x"),
                                 "--quant", "q9"])  # fmt: skip
    assert result.exit_code == 2 and "--quant q9: choose one of" in result.stderr
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # import fails
    result = runner.invoke(app, ["export", str(persona), "--gguf", str(tmp_path / "x"),
                                 "--quant", "q4_k_m"])  # fmt: skip
    assert result.exit_code == 2 and "personatune[llama-cpp]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    result = runner.invoke(app, ["export", str(persona), "--gguf", str(taken)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    result = runner.invoke(app, ["export", str(persona), "--gguf", str(taken), "--overwrite"])
    assert result.exit_code == 2 and "not a GGUF export folder" in result.stderr
    assert (taken / "mine.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".x.partial*")) and not (tmp_path / "x").exists()

    phi = AutoModelForCausalLM.from_pretrained(
        build_tiny("phi", tmp_path / "phi", embedded_tokenizer)
    )
    with pytest.raises(PersonatuneError, match="supports the llama and qwen2 architectures"):
        write_model_gguf(tmp_path / "phi.gguf", phi, embedded_tokenizer, name="phi")
    assert not (tmp_path / "phi.gguf").exists()


def test_chat_frame_refuses_a_template_ollama_cannot_express(embedded_tokenizer):
    """Guards against writing an Ollama TEMPLATE that silently differs from a chat template
    which rewrites earlier turns (Llama 2 folds the system prompt into the first user
    message)."""
    tok = embedded_tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
            "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
        )
        with pytest.raises(PersonatuneError, match="cannot be written as an Ollama TEMPLATE"):
            chat_frame(tok)
    finally:
        tok.chat_template = saved


def test_llama_cpp_quant_keeps_the_persona_metadata(personas, tmp_path):
    """Guards against a q4_k_m export (llama.cpp's quantizer) that loses the chat template
    or end-of-turn token, or that transformers cannot load."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (extra llama-cpp)")
    import gguf

    out = export(personas["llama"], tmp_path / "q4", "--quant", "q4_k_m")
    f = out / "alpha-q4_k_m.gguf"
    meta = gguf_fields(f)
    p = load_persona(personas["llama"])
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert meta["tokenizer.chat_template"] == p.tokenizer.chat_template
    assert meta["tokenizer.ggml.eot_token_id"] == p.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not list(out.glob("*.tmp"))
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=f.name)
    assert model.config.num_hidden_layers == 2


@pytest.mark.integration
def test_embedded_pirate_gguf_round_trip(tmp_path):
    """Guards against an export of the real model (SmolLM2-135M, 30 layers, tied
    embeddings, GQA) that transformers or llama.cpp read differently from base + adapter,
    or whose Modelfile template differs from its chat template."""
    from test_serve import train_embedded_personas

    persona = train_embedded_personas(tmp_path / "personas")[0]
    out = export(persona, tmp_path / "f16", "--quant", "f16")
    p, _ = compare_with_persona(persona, out, "pirate-f16.gguf", EMBEDDED_TOLERANCE["f16"])
    q8 = export(persona, tmp_path / "q8", "--quant", "q8_0")
    compare_with_persona(persona, q8, "pirate-q8_0.gguf", EMBEDDED_TOLERANCE["q8_0"], greedy=False)
    if shutil.which("go"):
        check_modelfile(persona, out)
    try:
        import llama_cpp
    except ImportError:
        return
    ids = encode(p.tokenizer, with_system_prompt(USER, p.spec.system_prompt))
    llm = llama_cpp.Llama(str(out / "pirate-f16.gguf"), n_ctx=512, n_threads=2, verbose=False)
    n = EMBEDDED_LLAMA_CPP_SHARED
    got = list(itertools.islice(llm.generate(ids, temp=0.0, top_k=1), n))
    with torch.inference_mode():
        want = p.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    assert got == want
