"""The five seed-system recipes: each parses, trains two steps on a tiny random model of its
architecture with its own settings, and adapts real layers. Plus the data features the
recipes rely on: Alpaca files, ``hf:`` sources with a seeded subset and an exact eval size."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny
from safetensors.torch import load_file
from transformers import TrainerCallback

from personatune.config import load_spec
from personatune.data.chat import FALLBACK_TEMPLATE, ensure_chat_template
from personatune.data.dataset import load_examples, prepare_data
from personatune.data.loaders import load_source
from personatune.errors import PersonatuneError
from personatune.io import read_jsonl as read_log
from personatune.models import load_tokenizer, resolve_ref
from personatune.train.trainer import collator, train

REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

# recipe file -> (architecture, data swapped in for the Hub ids and the corpus output).
# None keeps the recipe's own local files, 8 examples of each. Sizes shrink with the data
# but keep the recipe's subset_size / eval_size shape.
RECIPES = {
    "qwen2.5-0.5b-pirate.yaml": ("qwen2", None),
    "qwen2.5-7b-sherlock.yaml": ("qwen2", [{"path": "SHERLOCK"}]),
    "falcon-7b-persona-chat.yaml": (
        "falcon",
        [{"path": str(FIXTURES / "personachat_parlai.jsonl"), "format": "personachat"}],
    ),
    "phi-2-alpaca.yaml": (
        "phi",
        [
            {
                "path": str(FIXTURES / "alpaca_small.json"),
                "format": "alpaca",
                "subset_size": 11,
                "eval_size": 1,
            }
        ],
    ),
    "llama-2-7b-chat-persona-chat.yaml": (
        "llama",
        [
            {
                "path": str(FIXTURES / "personachat_cynaptics.jsonl"),
                "format": "personachat",
                "subset_size": 3,
                "eval_size": 1,
            }
        ],
    ),
}


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    # fp32 keeps the tiny runs independent of the CPU's bf16 support.
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, embedded_tokenizer):
    """One tiny random model per architecture. Falcon's and Phi's tokenizers get no chat
    template, like the real ones, so the fallback template applies."""
    import copy

    out = {}
    for arch in ("qwen2", "falcon", "phi", "llama"):
        tok = copy.deepcopy(embedded_tokenizer)
        if arch in ("falcon", "phi"):
            tok.chat_template = None
        out[arch] = build_tiny(arch, tmp_path_factory.mktemp(arch) / "model", tok)
    return out


def sherlock_pairs(tmp_path) -> str:
    """Stand-in for the from-corpus output: prompt/response pairs in JSONL."""
    path = tmp_path / "holmes_pairs.jsonl"
    rows = [
        {
            "prompt": f"What do you make of clue {i}?",
            "response": f"It is elementary: clue {i} points to the gardener.",
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class PackingProbe(TrainerCallback):
    """At the start of training, in the trainer's own set-up (train mode, gradient
    checkpointing as configured), compare the logits of an example packed after another
    with the logits of the example alone. Dropout is switched off for the probe."""

    def __init__(self, spec, tokenizer):
        self.spec, self.tokenizer, self.diff = spec, tokenizer, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        if not self.spec.train.packing:
            return
        a = {"input_ids": list(range(100, 109)), "labels": list(range(100, 109))}
        b = {"input_ids": list(range(200, 206)), "labels": list(range(200, 206))}
        batch = collator(self.spec, self.tokenizer)([a, b])
        drops = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        for m, _ in drops:
            m.p = 0.0
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            alone = model(input_ids=torch.tensor([b["input_ids"]]))
        for m, p in drops:
            m.p = p
        self.diff = (packed.logits[0, len(a["input_ids"]) :] - alone.logits[0]).abs().max().item()


def recipe_spec(name, tmp_path, tiny_models, extra=()):
    """Parse the recipe, then swap in the tiny model and the fixtures for a CPU run:
    quantization none (bitsandbytes NF4 needs CUDA), adamw_torch where the recipe asks
    for a paged optimizer (bitsandbytes paged optimizers need CUDA), two steps."""
    arch, data = RECIPES[name]
    spec = load_spec(REPO / "recipes" / name)  # parses as published
    overrides = [
        f"model.name={tiny_models[arch]}",
        "model.quantization=none",
        "train.max_steps=2",
        "train.eval_split=0",
        "guard.enabled=false",  # a random model has no capability to guard
        f"output_dir={tmp_path / 'out'}",
    ]
    if spec.train.optimizer.startswith("paged_"):
        overrides.append("train.optimizer=adamw_torch")
    if data is None:
        data = [
            dict(d.model_dump(), path=str(spec.resolve(d.path)), subset_size=8) for d in spec.data
        ]
    else:
        data = [
            dict(d, path=sherlock_pairs(tmp_path)) if d["path"] == "SHERLOCK" else d for d in data
        ]
        # The recipe's other per-source fields (split, system_prompt) are kept.
        published = spec.data[0].model_dump(
            exclude={"path", "eval_path", "subset_size", "eval_size"}
        )
        data = [{**published, **d} for d in data]
    overrides.append("data=" + json.dumps(data))
    return spec, load_spec(REPO / "recipes" / name, overrides + list(extra))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_two_steps_and_adapts_real_layers(name, tmp_path, tiny_models):
    """Guards against a recipe that does not parse, settings that fail on its architecture,
    target module names that match no layer of it (peft only errors when none match), and
    packing turned on where packed examples would attend to each other."""
    published, spec = recipe_spec(name, tmp_path, tiny_models)
    arch = RECIPES[name][0]
    assert spec.model.quantization == "none" and published.model.quantization == "nf4"
    probe = PackingProbe(spec, load_tokenizer(resolve_ref(str(tiny_models[arch]))))
    out = train(spec, callbacks=[probe])

    log = read_log(out / "train_log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    manifest = json.loads((out / "persona.json").read_text())
    assert manifest["training"]["steps"] == 2
    assert manifest["training"]["effective_batch"] == (
        published.train.batch_size * published.train.gradient_accumulation
    )

    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (
        published.lora.r,
        published.lora.alpha,
        published.lora.dropout,
    )
    targets = published.lora.target_modules
    assert isinstance(targets, list) and sorted(config["target_modules"]) == sorted(targets)
    weights = load_file(str(out / "adapter_model.safetensors"))
    a_keys = [k for k in weights if k.endswith("lora_A.weight")]
    for layer in (0, 1):  # every named target is a real layer in every block
        for t in targets:
            pat = re.compile(rf"\.(layers|h)\.{layer}\.(.+\.)?{re.escape(t)}\.lora_A\.weight$")
            assert sum(bool(pat.search(k)) for k in a_keys) == 1, f"{t} in block {layer}"
    assert len(a_keys) == 2 * len(targets)
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)

    if spec.train.packing:
        assert probe.diff is not None and probe.diff < 1e-4, f"packed examples leak: {probe.diff}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NF4 needs CUDA and bitsandbytes")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_nf4_quantizes_every_target_layer(name, tmp_path):
    """Guards against a recipe's ``quantization: nf4`` leaving layers in full precision:
    transformers 5 swaps in bitsandbytes layers only for modules whose type is exactly
    ``nn.Linear``, so a subclass such as Falcon's ``FalconLinear`` stays unquantized."""
    import bitsandbytes as bnb

    from personatune.models import load_model

    spec = load_spec(REPO / "recipes" / name)
    path = build_tiny(RECIPES[name][0], tmp_path / "model", None, hidden_size=64)
    model = load_model(resolve_ref(str(path)), spec.model.quantization, torch.device("cuda"))
    layers = {
        n: type(m).__name__
        for n, m in model.named_modules()
        if n.split(".")[-1] in spec.lora.target_modules
    }
    assert len(layers) == 2 * len(spec.lora.target_modules)
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in layers), layers


def test_sherlock_recipe_resumes(tmp_path, tiny_models):
    """Guards against the Sherlock recipe's resume (the seed's RESUME_CHECKPOINT, our
    --resume) restarting from scratch instead of its newest checkpoint."""

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 1:
                raise KeyboardInterrupt("simulated crash")

    _, spec = recipe_spec(
        "qwen2.5-7b-sherlock.yaml", tmp_path, tiny_models, ["train.checkpoint_interval=1"]
    )
    with pytest.raises(KeyboardInterrupt):
        train(spec, callbacks=[Crash()])
    assert not spec.output_path.exists()
    out = train(spec, resume=True)
    manifest = json.loads((out / "persona.json").read_text())
    assert manifest["training"]["resumed_from"] == "checkpoint-1"
    assert manifest["training"]["steps"] == 2


def test_recipes_carry_published_values():
    """Guards against a recipe drifting from the values SEED_SYSTEMS.md publishes."""
    r = {n: load_spec(REPO / "recipes" / n) for n in RECIPES}
    pirate, sherlock = r["qwen2.5-0.5b-pirate.yaml"], r["qwen2.5-7b-sherlock.yaml"]
    falcon, phi = r["falcon-7b-persona-chat.yaml"], r["phi-2-alpaca.yaml"]
    llama = r["llama-2-7b-chat-persona-chat.yaml"]
    assert [s.model.name for s in r.values()] == [
        "Qwen/Qwen2.5-0.5B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "tiiuae/falcon-7b",
        "microsoft/phi-2",
        "NousResearch/Llama-2-7b-chat-hf",
    ]
    assert all(s.model.quantization == "nf4" for s in r.values())
    assert (
        pirate.lora.r,
        pirate.lora.alpha,
        pirate.train.learning_rate,
        pirate.train.epochs,
        pirate.train.batch_size,
        pirate.train.gradient_accumulation,
    ) == (16, 32, 2e-4, 3, 2, 4)
    t = sherlock.train
    assert (sherlock.lora.r, sherlock.lora.alpha, sherlock.lora.dropout) == (16, 32, 0.05)
    assert (
        t.learning_rate,
        t.lr_scheduler,
        t.warmup_steps,
        t.optimizer,
        t.epochs,
        t.max_seq_length,
        t.batch_size * t.gradient_accumulation,
    ) == (2e-4, "cosine", 100, "paged_adamw_32bit", 3, 1024, 8)
    assert (falcon.lora.r, falcon.lora.alpha, falcon.lora.dropout) == (16, 32, 0.05)
    t = phi.train
    assert (
        phi.lora.r,
        phi.lora.alpha,
        phi.lora.dropout,
        t.learning_rate,
        t.weight_decay,
        t.epochs,
        t.batch_size,
        t.gradient_accumulation,
        t.max_seq_length,
    ) == (4, 8, 0.05, 3e-4, 0.01, 1, 2, 8, 128)
    src = phi.data[0]
    assert (src.path, src.subset_size - src.eval_size, src.eval_size) == (
        "hf:tatsu-lab/alpaca",
        5000,
        500,
    )
    t = llama.train
    assert (
        llama.lora.r,
        llama.lora.alpha,
        llama.lora.dropout,
        t.batch_size,
        t.learning_rate,
        t.lr_scheduler,
        t.optimizer,
    ) == (64, 16, 0.1, 4, 2e-4, "cosine", "paged_adamw_32bit")
    src = llama.data[0]
    assert (src.path, src.subset_size - src.eval_size) == ("hf:Cynaptics/persona-chat", 1000)
    assert "[INST]" in llama.model.chat_template
    # The pirate recipe's own local files load (the other recipes read Hub ids).
    assert all(len(exs) > 100 for exs, _ in load_examples(pirate))
    # Falcon-7B and Phi-2 have no template of their own: the fallback applies.
    for spec in (falcon, phi):
        assert spec.model.chat_template is None


# ---- data the recipes need ------------------------------------------------------------


def test_alpaca_fixture_renders_instruction_then_output(tmp_path, embedded_tokenizer):
    """Guards against losing Alpaca's input field, or training on the instruction rather
    than the output and its EOS (Phi-2 recipe, fallback template)."""
    import copy

    ex = load_source(load_spec(_spec_file(tmp_path, FIXTURES / "alpaca_small.json")).data[0])
    assert len(ex) == 12
    assert ex[1].messages == [
        {"role": "user", "content": "Add the two numbers.\n\n17 and 25"},
        {"role": "assistant", "content": "42"},
    ]
    assert ex[0].messages[0]["content"] == "Name the largest planet in the solar system."
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = None
    ensure_chat_template(tok, None)
    assert tok.chat_template == FALLBACK_TEMPLATE
    spec = load_spec(
        _spec_file(tmp_path, FIXTURES / "alpaca_small.json", "format: alpaca"),
        ["train.eval_split=0", "train.max_seq_length=128"],
    )
    row = prepare_data(spec, tok).train[1]
    trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(trained) == "42" + tok.eos_token
    assert tok.decode(row["input_ids"]).startswith("### User:\nAdd the two numbers.\n\n17 and 25")


def _spec_file(tmp_path, path, extra: str = "") -> Path:
    spec = tmp_path / "p.yaml"
    lines = [f"    {extra}"] if extra else []
    spec.write_text("\n".join(["name: p", "data:", f"  - path: {path}", *lines]) + "\n")
    return spec


@pytest.fixture
def hub_dir(tmp_path):
    """A local dataset folder that ``datasets.load_dataset`` reads like a Hub id."""
    folder = tmp_path / "alpaca_hub"
    folder.mkdir()
    rows = json.loads((FIXTURES / "alpaca_small.json").read_text())
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_hf_source_seeded_subset_and_exact_eval_size(tmp_path, hub_dir, embedded_tokenizer):
    """Guards against hf: sources ignoring subset_size or the seed, and against eval_size
    not giving an exact train / eval count (Phi-2's 5,000 / 500)."""

    def spec(seed, subset=8, eval_size=3):
        return load_spec(
            _spec_file(tmp_path, f"hf:{hub_dir}", "format: alpaca"),
            [
                f"train.seed={seed}",
                (
                    f"data=[{{path: 'hf:{hub_dir}', format: alpaca, subset_size: {subset}, "
                    f"eval_size: {eval_size}}}]"
                ),
            ],
        )

    picked = {
        seed: [e.key() for exs, _ in load_examples(spec(seed)) for e in exs] for seed in (1, 2)
    }
    assert len(picked[1]) == 8
    assert picked[1] == [e.key() for exs, _ in load_examples(spec(1)) for e in exs]
    assert picked[1] != picked[2]
    data = prepare_data(spec(1), embedded_tokenizer)
    assert (len(data.train), len(data.eval)) == (5, 3)
    assert (data.stats[0].train, data.stats[0].eval) == (5, 3)
    held = {e.key() for e in data.eval_examples}
    assert held <= set(picked[1])
    # eval_size 0 holds nothing out; eval_size >= kept is a clear error
    assert len(prepare_data(spec(1, eval_size=0), embedded_tokenizer).eval) == 0
    with pytest.raises(PersonatuneError, match="eval_size 8 leaves no training examples"):
        prepare_data(spec(1, eval_size=8), embedded_tokenizer)


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path):
    """Guards against a raw datasets traceback when a recipe's Hub dataset is offline."""
    spec = load_spec(REPO / "recipes" / "phi-2-alpaca.yaml")
    with pytest.raises(PersonatuneError, match="dataset 'tatsu-lab/alpaca': cannot load it"):
        load_source(spec.data[0])


def test_recipe_yaml_files_are_all_tested():
    """Guards against a new recipe shipping without its test."""
    assert sorted(p.name for p in (REPO / "recipes").glob("*.yaml")) == sorted(RECIPES)
    for p in (REPO / "recipes").glob("*.yaml"):
        assert yaml.safe_load(p.read_text())["name"] == p.stem
