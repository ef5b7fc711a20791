"""personatune chat with several personas: /persona switching, /reset, --quick-test."""

from __future__ import annotations

import pytest
from rich.console import Console
from test_serve import TINY_PERSONAS, USER, References, train_tiny_personas
from typer.testing import CliRunner

from personatune import cli

runner = CliRunner()


@pytest.fixture(scope="module")
def personas(tmp_path_factory, tiny_model):
    return train_tiny_personas(tmp_path_factory.mktemp("chat"), tiny_model)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # a wide console keeps table cells on one line, so answers can be found in the output
    monkeypatch.setattr(cli, "console", Console(width=1000))


def test_quick_test_answers_every_test_prompt_per_persona(personas):
    """Guards against --quick-test skipping a persona or a prompt, or answering with the
    wrong adapter."""
    result = runner.invoke(
        cli.app, ["chat", *map(str, personas), "--quick-test", "--max-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    ref = References(personas, 0)
    prompts = ["What is 2+2?", "Name a colour.", "Say hello."]
    for q in prompts:
        assert result.output.count(q) == 1
        for name, *_ in TINY_PERSONAS:
            answer = ref.answer(name, [{"role": "user", "content": q}], 6)
            assert answer in result.output
    header = next(line for line in result.stdout.splitlines() if line.startswith("┃"))
    assert "alpha" in header and "beta" in header


def test_persona_switch_and_reset(personas):
    """Guards against /persona not switching the adapter, unknown names crashing the chat,
    and /reset not clearing the history."""
    script = (
        "\n".join(
            ["/persona beta", USER[0]["content"], "/persona nobody", "/reset", "/personas", "/exit"]
        )
        + "\n"
    )
    result = runner.invoke(
        cli.app, ["chat", *map(str, personas), "--max-tokens", "6"], input=script
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Beta, a cheerful parrot." in out and "no persona 'nobody'" in out
    assert "conversation cleared" in out
    ref = References(personas, 0)
    assert ref.answer("beta", USER, 6) in out
    assert ref.answer("alpha", USER, 6) not in out  # beta answered, not alpha


def test_one_shot_prompt_uses_first_persona(personas):
    """Guards against --prompt answering without the persona's adapter or system prompt."""
    result = runner.invoke(
        cli.app, ["chat", *map(str, personas), "--prompt", USER[0]["content"], "--max-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == References(personas, 0).answer("alpha", USER, 6)
