"""The persona spec schema, YAML loading and key=value overrides."""

import pytest

from personatune.config import PersonaSpec, apply_overrides, load_spec, valid_keys
from personatune.errors import PersonatuneError


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_seed_systems(tmp_path):
    """Guards against drifting defaults: r 16, alpha 32, dropout 0.05, all linear, lr 2e-4, cosine."""
    spec = load_spec(write(tmp_path, "name: x\ndata: [{path: a.csv}]\n"))
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert spec.lora.target_modules == "all-linear"
    assert spec.train.learning_rate == 2e-4 and spec.train.lr_scheduler == "cosine"
    assert spec.model.name == "embedded"
    assert spec.resolve("a.csv") == tmp_path / "a.csv"


def test_every_field_has_a_docstring():
    """Guards against undocumented config fields (the schema is the documentation)."""

    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no docstring"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(PersonaSpec)


def test_overrides_set_nested_values(tmp_path):
    spec = load_spec(
        write(tmp_path, "name: x\ndata: [{path: a.csv}]\n"),
        ["train.epochs=1", "lora.r=8", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert spec.train.epochs == 1 and spec.lora.r == 8
    assert spec.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_override_suggests_nearest_key():
    with pytest.raises(
        PersonatuneError,
        match="unknown key 'train.learning_rat'; did you mean 'train.learning_rate'",
    ):
        apply_overrides({}, ["train.learning_rat=1e-4"])


def test_unknown_yaml_key_suggests_nearest_key(tmp_path):
    p = write(tmp_path, "name: x\ndata: [{path: a.csv}]\nlora:\n  rank: 8\n")
    with pytest.raises(
        PersonatuneError, match=r"p.yaml: unknown key 'lora.rank'; did you mean 'lora.r'"
    ):
        load_spec(p)


@pytest.mark.parametrize(
    "text,match",
    [
        ("name: x\ndata: [{path: a.csv}]\ntrain: {learning_rate: -1}\n", "train.learning_rate"),
        ("name: x\n", "'data'"),
        ("name: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_specs_name_the_key(tmp_path, text, match):
    with pytest.raises(PersonatuneError, match=match):
        load_spec(write(tmp_path, text))


def test_override_without_equals_is_an_error():
    with pytest.raises(PersonatuneError, match="is not key=value"):
        apply_overrides({}, ["train.epochs"])


def test_valid_keys_are_dotted():
    keys = valid_keys()
    assert "train.max_seq_length" in keys and "lora.alpha" in keys and "base_dir" not in keys
