"""Export a persona as GGUF for llama.cpp, Ollama and LM Studio: the adapter merged into
the base weights (one file), or the adapter alone as a llama.cpp LoRA adapter beside a base
GGUF, with the tokenizer, chat template and end-of-turn tokens in the metadata, and an
Ollama Modelfile.

Tensor names and metadata keys come from the ``gguf`` package (llama.cpp's gguf-py); the
conversion follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2Model``,
``TextModel.set_gguf_parameters``, ``get_vocab_base``) and ``convert_lora_to_gguf.py``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import shutil
import tempfile
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from personatune.errors import PersonatuneError
from personatune.io import building, check_replaceable, write_text
from personatune.persona import read_spec

#: Architectures written, by transformers ``model_type``.
ARCHS = ("llama", "qwen2")

#: Types the ``gguf`` package writes itself, as ``convert_hf_to_gguf.py --outtype`` does:
#: name -> (llama file type, tensor type of the 2-D weights).
NATIVE = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"),
          "bf16": ("MOSTLY_BF16", "BF16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}  # fmt: skip

#: Types made by llama.cpp's own quantizer (``llama-quantize``) through llama-cpp-python.
LLAMA_CPP = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
             "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")  # fmt: skip

#: The text llama.cpp tokenizes to name a BPE pre-tokenizer: the sha256 of the token ids
#: picks the name (``get_vocab_base_pre`` in llama.cpp's conversion/base.py).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: The hashes of the tokenizers used with llama and qwen2 models, copied from llama.cpp's
#: conversion/base.py (llama-cpp-python 0.3.36's vendored copy).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
}


def check_quant(quant: str) -> None:
    """Refuse an unknown ``--quant``, or one that needs llama-cpp-python when it is missing.

    Raises:
        PersonatuneError: one line naming the choices or the extra to install.
    """
    if quant in NATIVE:
        return
    if quant not in LLAMA_CPP:
        raise PersonatuneError(f"--quant {quant}: choose one of {', '.join([*NATIVE, *LLAMA_CPP])}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PersonatuneError(
            f"--quant {quant} needs llama.cpp's quantizer: pip install 'personatune[llama-cpp]' "
            "(builds llama-cpp-python), or use --quant q8_0 or f16"
        ) from None


def stop_tokens(model, tokenizer, frame) -> list[int]:
    """The persona's end-of-turn token ids (:func:`personatune.engine.end_of_turn_ids`:
    generation config EOS, tokenizer EOS, the template's turn-closing token), the one
    that closes an assistant turn in ``frame`` (a :class:`ChatFrame`) first: it becomes
    ``tokenizer.ggml.eot_token_id``."""
    from personatune.engine import end_of_turn_ids

    closing = tokenizer(frame.suffix["assistant"], add_special_tokens=False)["input_ids"][:1]
    return sorted(end_of_turn_ids(model, tokenizer), key=lambda i: (i not in closing, i))


def _arch(config):
    import gguf

    if config.model_type not in ARCHS:
        raise PersonatuneError(
            f"GGUF export supports the {' and '.join(ARCHS)} architectures; this base model "
            f"is {config.model_type}: use export --merged and llama.cpp's convert_hf_to_gguf.py"
        )
    return gguf.MODEL_ARCH.LLAMA if config.model_type == "llama" else gguf.MODEL_ARCH.QWEN2


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if getattr(config, "rope_scaling", None):  # transformers 4.x configs
        rope.update(config.rope_scaling)
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise PersonatuneError(
            f"GGUF export: RoPE scaling '{kind}' of this base model is not supported "
            "(default, linear, yarn and llama3 are); use export --merged and convert_hf_to_gguf.py"
        )
    rope["rope_type"] = kind
    return rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer, config) -> None:
    """``TextModel.set_gguf_parameters`` and ``LlamaModel.set_gguf_parameters``."""
    import gguf

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.to_dict().get("head_dim") is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.model_type == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(_head_dim(config))


def _rope_freqs(config) -> np.ndarray | None:
    """llama3 RoPE frequency factors (``LlamaModel.generate_extra_tensors``)."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    out = np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth))
    return np.where(wavelen < old / high, 1.0, out).astype(np.float32)


#: The pre-tokenizer regex of Qwen2's tokenizer.json, as quoted in llama.cpp's
#: src/llama-vocab.cpp for LLAMA_VOCAB_PRE_TYPE_QWEN2.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's BPE pre-tokenizer: by llama.cpp's hash of the
    ids of :data:`CHKTXT`, else by the pre-tokenizer itself where it is one llama.cpp
    implements (a vocabulary changed by fine-tuning changes the hash, not the splitting)."""
    import json

    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[chkhsh]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return None
    state = json.loads(backend.pre_tokenizer.__getstate__())
    parts = state.get("pretokenizers", [state])
    if parts == [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}]:  # fmt: skip
        return "gpt-2"
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[0].get("pattern", {}).get("Regex") == QWEN2_REGEX
        and parts[0].get("behavior") == "Isolated"
        and parts[1].get("type") == "ByteLevel"
        and parts[1].get("use_regex") is False
    ):
        return "qwen2"
    return None


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name (``TextModel.get_vocab_base``).

    Raises:
        PersonatuneError: a tokenizer whose pre-tokenizer llama.cpp does not know here.
    """
    import gguf

    pre = _pre_tokenizer(tokenizer)
    if pre is None or not hasattr(tokenizer, "vocab"):
        raise PersonatuneError(
            "GGUF export: this tokenizer is not one of the BPE tokenizers it knows "
            f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); use export --merged and "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre


def _add_tokenizer(writer, tokenizer, config, chat_template: str, eot: list[int]) -> None:
    import gguf

    tokens, types, pre = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="personatune-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=config.vocab_size)
    special.chat_template = chat_template
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)
    # personatune renders the chat template (BOS included where it writes one) and
    # tokenizes with add_special_tokens=False; llama.cpp and Ollama then must add nothing.
    writer.add_add_bos_token(False)
    if eot:
        writer.add_eot_token_id(eot[0])
        if tokenizer.eos_token_id is None:
            writer.add_eos_token_id(eot[0])


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's rotary layout for Q and K rows (``LlamaModel.permute``)."""
    n_head = n_head_kv or n_head
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(tmap, name: str) -> str:
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise PersonatuneError(f"GGUF export: tensor {name} has no llama.cpp name")
    return new


def _llama_layout(name: str, w: torch.Tensor, config) -> torch.Tensor:
    if config.model_type != "llama":
        return w
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute(w, config.num_attention_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute(w, config.num_attention_heads, config.num_key_value_heads)
    return w


def _model_tensors(model):
    """``(gguf name, float32 array)`` for each weight of a transformers llama/qwen2 model."""
    import gguf

    config = model.config
    tmap = gguf.get_tensor_name_map(_arch(config), config.num_hidden_layers)
    for name, w in model.state_dict().items():
        # llama.cpp uses token_embd for the output when output.weight is absent
        tied = name == "lm_head.weight" and config.tie_word_embeddings
        if tied or name.endswith("rotary_emb.inv_freq"):
            continue
        w = _llama_layout(name, w.detach().float(), config)
        yield _gguf_name(tmap, name), w.numpy()
    if (freqs := _rope_freqs(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs


def _encode(name: str, data: np.ndarray, quant: str):
    """The tensor type and bytes for one tensor (``ModelBase.prepare_tensors``): 1-D
    tensors and norms stay F32; 2-D weights take the file's type, F16 where a row does
    not split into its blocks."""
    import gguf

    qtype = gguf.GGMLQuantizationType[NATIVE[quant][1]]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return qtype, gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        f16 = gguf.GGMLQuantizationType.F16
        return f16, gguf.quants.quantize(data, f16)


def _write(path: Path, writer, tensors, quant: str) -> None:
    for name, data in tensors:
        qtype, encoded = _encode(name, data, quant)
        writer.add_tensor(name, encoded, raw_dtype=qtype)  # byte rows -> element shape inside
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_gguf(
    path: Path,
    model,
    tokenizer,
    *,
    name: str,
    quant: str = "q8_0",
    eot: list[int] | None = None,
) -> Path:
    """Write a transformers llama/qwen2 model and its tokenizer as one GGUF file.

    Args:
        path: the ``.gguf`` file to write.
        model: the model, float32 weights (``(out_features, in_features)`` matrices).
        tokenizer: its tokenizer; its ``chat_template`` goes into ``tokenizer.chat_template``.
        name: ``general.name``.
        quant: a key of :data:`NATIVE` or :data:`LLAMA_CPP` (the latter through
            llama.cpp's quantizer, from an intermediate F32 file).
        eot: end-of-turn token ids (:func:`stop_tokens`); the first becomes
            ``tokenizer.ggml.eot_token_id``; None: the chat template's.

    Raises:
        PersonatuneError: an unsupported architecture, tokenizer, RoPE type or quant.
    """
    import gguf

    check_quant(quant)
    config = model.config
    arch = _arch(config)
    if eot is None:
        from personatune.export.modelfile import chat_frame

        eot = stop_tokens(model, tokenizer, chat_frame(tokenizer))
    native = quant if quant in NATIVE else "f32"
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hparams(writer, config)
    writer.add_file_type(getattr(gguf.LlamaFileType, NATIVE[native][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config, tokenizer.chat_template, eot)
    if quant in NATIVE:
        _write(path, writer, _model_tensors(model), quant)
        return path
    tmp = path.with_name(path.name + ".f32.tmp")
    try:
        _write(tmp, writer, _model_tensors(model), "f32")
        llama_cpp_quantize(tmp, path, quant)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    """Quantize a GGUF file with llama.cpp's ``llama_model_quantize`` (the code behind
    ``llama-quantize``), through llama-cpp-python. Metadata is copied; tensors whose rows
    do not fit the type's blocks get llama.cpp's fallback type. Threads: llama.cpp's
    default (all cores).

    Raises:
        PersonatuneError: llama.cpp reports a failure.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's log, printed per tensor
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            ctypes.byref(params))  # fmt: skip
    finally:
        log.setLevel(level)
    if rc != 0:
        raise PersonatuneError(f"--quant {quant}: llama.cpp's quantizer failed (code {rc})")


def write_lora_gguf(
    path: Path, persona_dir: Path, config, *, name: str, quant: str = "f16"
) -> Path:
    """Write a peft LoRA adapter as a llama.cpp GGUF adapter (``--lora``), as
    ``convert_lora_to_gguf.py`` does: ``general.type=adapter``, ``adapter.type=lora``,
    ``adapter.lora.alpha``, and ``NAME.lora_a`` ``(rank, in_features)`` /
    ``NAME.lora_b`` ``(out_features, rank)`` per adapted weight, B in llama.cpp's Q/K row
    layout.

    llama.cpp scales every pair by ``alpha / rank``; where peft's scale differs (rsLoRA,
    per-module ``rank_pattern``/``alpha_pattern``) the difference is folded into B.

    Args:
        path: the ``.gguf`` file to write.
        persona_dir: the persona directory (``adapter_config.json``,
            ``adapter_model.safetensors``).
        config: the base model's transformers config.
        name: ``general.name``.
        quant: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the A and B matrices.

    Raises:
        PersonatuneError: an unsupported architecture, a DoRA adapter, or tensors that are
            not LoRA pairs of linear layers (embedding LoRA, ``modules_to_save``).
    """
    import gguf
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    from personatune.io import read_json

    if quant not in NATIVE:
        raise PersonatuneError(f"--quant {quant}: a LoRA GGUF takes {', '.join(NATIVE)}")
    arch = _arch(config)
    lcfg = read_json(persona_dir / "adapter_config.json")
    if lcfg.get("use_dora"):
        raise PersonatuneError("--lora-gguf: llama.cpp does not run DoRA adapters; use --gguf")
    weights = load_file(persona_dir / "adapter_model.safetensors")
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    alpha = float(lcfg["lora_alpha"])
    pattern = lcfg.get("alpha_pattern") or {}
    pairs: dict[str, dict] = {}
    for key, t in weights.items():
        base = key.replace("base_model.model.", "", 1)
        for part in ("A", "B"):
            if base.endswith(f".lora_{part}.weight"):
                pairs.setdefault(base.replace(f".lora_{part}.weight", ".weight"), {})[part] = t
                break
        else:
            raise PersonatuneError(
                f"--lora-gguf: adapter tensor {key} is not a LoRA pair of a linear layer; "
                "use --gguf (merged) for this adapter"
            )
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, NATIVE[quant][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def tensors():
        for base, ab in sorted(pairs.items()):
            a, b = ab["A"].float(), ab["B"].float()
            rank = a.shape[0]  # rank_pattern shows in the shapes
            key = get_pattern_key(list(pattern), base.removesuffix(".weight"))  # peft's matching
            m_alpha = pattern.get(key, alpha)
            peft_scale = m_alpha / (math.sqrt(rank) if lcfg.get("use_rslora") else rank)
            b = _llama_layout(base, b * (peft_scale / (alpha / rank)), config)
            target = _gguf_name(tmap, base)
            yield target + ".lora_a", a.numpy()
            yield target + ".lora_b", b.numpy()

    _write(path, writer, tensors(), quant)
    return path


def export_gguf(
    persona_dir: str | Path,
    out: str | Path,
    *,
    quant: str = "q8_0",
    lora: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a persona for llama.cpp, Ollama and LM Studio into the folder ``out``.

    Merged (default): ``NAME-QUANT.gguf``, the adapter merged into the base weights
    (:func:`personatune.export.merged.merge_persona`) with the tokenizer, the persona's chat
    template and its end-of-turn token ids in the metadata, and ``Modelfile`` (Ollama:
    ``FROM`` that file, ``SYSTEM``, ``TEMPLATE``, ``PARAMETER stop``).

    ``lora=True``: ``base-QUANT.gguf`` (the base model alone, same metadata),
    ``NAME-lora-f16.gguf`` (the adapter for llama.cpp's ``--lora``, or
    ``q8_0``/``f32``/``bf16`` when ``quant`` is one of those), and a Modelfile with
    ``FROM`` the base and ``ADAPTER`` the adapter. One base file serves every persona
    trained on it.

    Written into a temporary folder beside ``out`` and renamed when complete.

    Args:
        persona_dir: a persona directory from ``personatune train``.
        out: the folder to write.
        quant: the weight type: ``f32``, ``f16``, ``bf16``, ``q8_0`` (written by the gguf
            package) or a llama.cpp type such as ``q4_k_m`` (needs llama-cpp-python).
        lora: write the adapter as a separate LoRA GGUF instead of merging it.
        overwrite: replace ``out`` if it is a GGUF export personatune wrote.

    Returns:
        ``out``.

    Raises:
        PersonatuneError: not a persona directory, ``out`` exists (without ``overwrite``,
            or not written by personatune), an unknown quant, an architecture other than
            llama or qwen2, or a chat template an Ollama TEMPLATE cannot express.
    """
    from personatune.export.merged import merge_persona
    from personatune.export.modelfile import chat_frame, go_template, modelfile

    persona_dir, out = Path(persona_dir), Path(out)
    spec = read_spec(persona_dir)
    check_quant(quant)
    if out.exists() and not overwrite:
        raise PersonatuneError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out, "GGUF export folder", [persona_dir], ("Modelfile",))
    merged = merge_persona(persona_dir, merge=not lora)
    model, tokenizer = merged.model, merged.tokenizer
    _arch(model.config)
    frame = chat_frame(tokenizer)  # refuse before the slow write
    eot = stop_tokens(model, tokenizer, frame)
    stops = tokenizer.convert_ids_to_tokens(eot)
    with building(out) as work:
        if lora:
            model_file = f"base-{quant}.gguf"
            write_model_gguf(work / model_file, model, tokenizer, name=str(merged.ref.name),
                             quant=quant, eot=eot)  # fmt: skip
            adapter = f"{spec.name}-lora-{quant if quant in NATIVE else 'f16'}.gguf"
            write_lora_gguf(work / adapter, persona_dir, model.config, name=spec.name,
                            quant=quant if quant in NATIVE else "f16")  # fmt: skip
        else:
            model_file, adapter = f"{spec.name}-{quant}.gguf", None
            write_model_gguf(work / model_file, model, tokenizer, name=spec.name, quant=quant,
                             eot=eot)  # fmt: skip
        text = modelfile(f"./{model_file}", spec.system_prompt, go_template(frame), stops,
                         f"./{adapter}" if adapter else None)  # fmt: skip
        write_text(work / "Modelfile", text)
        if (persona_dir / "persona.json").exists():
            shutil.copy(persona_dir / "persona.json", work / "persona.json")
    return out
