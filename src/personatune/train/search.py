"""The guard's search: when the retention gate refuses every checkpoint, train again from
the base model with the levers that the guard ablation measured
(benchmarks/results/guard_ablation.md: more self-distilled preservation data lowered
drift and the probe drop; a lower learning rate and earlier, more frequent checkpoints
give points nearer the base model), within ``guard.search_budget_s`` seconds.

Each round is a normal ``personatune train`` run of the spec with a few settings
changed, written to ``<work>/search/round-N`` with its own gate; the base model's answers
come from the guard's answer cache, so only the new training and its checkpoints cost
time. The rounds are a fixed ladder (:func:`plan`), so a search is deterministic, and an
interrupted one continues with ``personatune train SPEC --resume``: finished rounds are
read back from ``search.json``, an unfinished round is resumed from its last checkpoint.

Every checkpoint of every run is a point of the persona-against-retention frontier
(``frontier.json`` and ``frontier.png`` in the run folder). The first round whose gate
passes is published: the highest persona adoption within tolerance that the search found.
When none passes, the refusal says which lever to change, read from the frontier.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from personatune.config import PersonaSpec, dump_spec
from personatune.io import partial_dir, read_json, write_json, write_text
from personatune.persona import ADAPTER_WEIGHTS, CHECKPOINTS, MANIFEST, SPEC, TRAIN_LOG
from personatune.train.guard import GateFailed, guard_history

SEARCH = "search"
FRONTIER_JSON, FRONTIER_PNG = "frontier.json", "frontier.png"
#: Checkpoints a round aims for: the frontier gets several points per round, early ones
#: included (the pirate's gate chose step 80 of 136 at ratio 0.1).
ROUND_CHECKPOINTS = 6
#: Checkpoint files a finished run no longer needs (its adapter is kept): the optimizer
#: state is twice the adapter's size.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


@dataclass(frozen=True)
class Round:
    """One training run of the search.

    Attributes:
        name: ``round-N``, its folder under ``<work>/search``.
        settings: dotted spec keys and the values this round uses.
        why: what the round changes, for people.
    """

    name: str
    settings: dict
    why: str


def plan(spec: PersonaSpec, steps: int) -> list[Round]:
    """The rounds of a search, in order: (1) 2.5x the preservation data (at least ratio
    0.25, which took the pirate's drift below the base model's) with checkpoints twice as
    often; (2) the same at half the learning rate; (3) 5x the data (at least 0.5, the
    ablation's lowest probe drop) at a quarter of the learning rate.

    Args:
        steps: optimizer steps of the refused run; checkpoints are placed so that a
            round saves about :data:`ROUND_CHECKPOINTS` of them.
    """
    g, t = spec.guard, spec.train
    every = max(1, min(t.checkpoint_interval // 2, math.ceil(steps / ROUND_CHECKPOINTS)))
    r1 = round(max(0.25, 2.5 * g.preservation_ratio), 3)
    r3 = round(max(0.5, 5 * g.preservation_ratio), 3)
    lr = t.learning_rate

    def rnd(n: int, ratio: float, lr_factor: float, why: str) -> Round:
        settings = {"guard.preservation_ratio": ratio, "train.checkpoint_interval": every}
        if lr_factor != 1:
            settings["train.learning_rate"] = lr * lr_factor
        return Round(f"round-{n}", settings, why)

    return [
        rnd(1, r1, 1, f"more preservation data (ratio {r1:g}), a checkpoint every {every} steps"),
        rnd(2, r1, 1 / 2, f"ratio {r1:g} and half the learning rate ({lr / 2:g})"),
        rnd(3, r3, 1 / 4, f"ratio {r3:g} and a quarter of the learning rate ({lr / 4:g})"),
    ]


def round_spec(spec: PersonaSpec, rnd: Round, output: Path) -> PersonaSpec:
    """``spec`` with the round's settings, written to ``output``, and no nested search."""
    raw = spec.model_dump(mode="json")
    for key, value in {**rnd.settings, "guard.search_budget_s": 0}.items():
        *parents, leaf = key.split(".")
        functools.reduce(dict.__getitem__, parents, raw)[leaf] = value
    raw["output_dir"] = str(output)
    return PersonaSpec.model_validate({**raw, "base_dir": spec.base_dir})


def frontier_points(run: Path, name: str, settings: dict) -> list[dict]:
    """The persona-against-retention points of one run folder: every checkpoint in its
    ``train_log.jsonl`` (guard subset metrics), with the gate's whole-probe metrics and
    verdict where the gate checked it (``gate.json``).

    Returns:
        ``[{"run", "settings", "step", "persona_score", "adoption_rate",
        "probe_accuracy", "probe_drop", "drift_ratio", "measured", "passed",
        "reasons"}]``; ``measured`` is ``whole probe`` or ``subset``, ``passed`` None for
        a checkpoint the gate did not reach.
    """
    base, rows = guard_history(run / TRAIN_LOG)
    gate = read_json(run / "gate.json") if (run / "gate.json").exists() else {}
    checked = {c["step"]: c for c in gate.get("checked", [])}
    points = []
    for r in rows:
        p = {"run": name, "settings": settings, "step": r["step"]}
        p.update(persona_score=r["persona_score"], adoption_rate=r.get("adoption_rate"))
        c = checked.get(r["step"])
        if c:
            p.update({k: c[k] for k in ("probe_accuracy", "probe_drop", "drift_ratio")})
            p.update(measured="whole probe", passed=c["passed"], reasons=c["reasons"])
        else:
            drop = (base or {}).get("probe_accuracy", r["probe_accuracy"]) - r["probe_accuracy"]
            p.update(probe_accuracy=r["probe_accuracy"], probe_drop=drop)
            p.update(drift_ratio=r["drift_ratio"], measured="subset", passed=None, reasons=[])
        points.append(p)
    return points


def _run_seconds(run: Path) -> dict:
    """Seconds a run spent, from its ``persona.json``: training, guard preparation,
    checkpoint evaluation and the gate, and the checkpoints evaluated."""
    m = read_json(run / MANIFEST) if (run / MANIFEST).exists() else {}
    guard = m.get("guard") or {}
    gate = guard.get("gate") or {}
    n = len(guard_history(run / TRAIN_LOG)[1])
    return {
        "train_s": (m.get("training") or {}).get("train_seconds", 0.0),
        "prepare_s": guard.get("prepare_s", 0.0),
        "eval_s": guard.get("eval_seconds", 0.0),
        "gate_s": gate.get("gate_s", 0.0),
        "checkpoints": max(n, 1),
        "steps": (m.get("training") or {}).get("steps", 0),
    }


def estimate_seconds(last: dict, ratio_from: float, ratio_to: float, checkpoints: int) -> float:
    """A round's expected seconds from the last run's (:func:`_run_seconds`): training
    scaled by the rows (persona rows times ``1 + ratio``), checkpoint evaluation and the
    gate scaled by the checkpoints, preparation as it was (its answers are cached)."""
    scale = (1 + ratio_to) / (1 + ratio_from)
    per_ckpt = (last["eval_s"] + last["gate_s"]) / last["checkpoints"]
    return last["train_s"] * scale + per_ckpt * checkpoints + last["prepare_s"]


def _prune(run: Path) -> None:
    """Drop the resume-only files of a finished run's checkpoints (the adapters stay)."""
    for ckpt in (run / CHECKPOINTS).glob("checkpoint-*"):
        for name in _RESUME_ONLY:
            (ckpt / name).unlink(missing_ok=True)


def _run_folder(output: Path) -> Path:
    """Where a round's files are: its persona directory if published, else its work folder."""
    return output if (output / ADAPTER_WEIGHTS).exists() else partial_dir(output)


def _kind(reason: str) -> str:
    """The limit a gate reason is about: ``knowledge``, ``drift`` or ``degeneration``."""
    if reason.startswith("drift"):
        return "drift"
    if any(w in reason for w in ("probe", "multiple choice")):
        return "knowledge"
    return "degeneration"


def advice(spec: PersonaSpec, points: list[dict], prompting: dict | None) -> list[str]:
    """What to change when no point of the frontier passed, read from the points the gate
    confirmed: which limits failed (the gate's reasons), at how many checkpoints, whether
    the search's levers moved the probe, and whether the adapter beats prompting."""
    g, t, lo = spec.guard, spec.train, spec.lora
    confirmed = [p for p in points if p["measured"] == "whole probe"]
    failing: dict[str, list[dict]] = {}
    for p in confirmed:
        for kind in dict.fromkeys(_kind(r) for r in p["reasons"]):
            failing.setdefault(kind, []).append(p)
    more_data = f"guard.preservation_ratio={max(1.0, 10 * g.preservation_ratio):g}"
    gentler = f"train.learning_rate={t.learning_rate / 4:g}, or lora.r={max(1, lo.r // 2)}"
    out = []
    if "knowledge" in failing:
        ps = failing["knowledge"]
        runs = list(dict.fromkeys(p["run"] for p in confirmed))
        best = [min(q["probe_drop"] for q in confirmed if q["run"] == r) for r in runs]
        moved = (
            f"; the search moved the smallest probe drop from {best[0]:.1f} to "
            f"{best[-1]:.1f} points"
            if len(best) > 1
            else ""
        )
        out.append(
            f"knowledge: {len(ps)} of {len(confirmed)} checkpoints lost more than "
            f"{g.probe_tolerance:g} points, the earliest (step {min(p['step'] for p in ps)}) "
            f"too{moved}. Train less per step ({gentler}), mix in more preservation data "
            f"({more_data}), or check that the persona data's answers are correct"
        )
    if "drift" in failing:
        out.append(
            f"drift: above {g.max_drift_ratio:g} at {len(failing['drift'])} of "
            f"{len(confirmed)} checkpoints. More preservation data ({more_data}) or fewer "
            f"steps (train.max_steps)"
        )
    if "degeneration" in failing:
        why = sorted({r for p in failing["degeneration"] for r in p["reasons"]
                      if _kind(r) == "degeneration"})[:2]  # fmt: skip
        out.append(
            f"degeneration ({'; '.join(why)}): fewer steps or a lower learning rate "
            f"({gentler}), and persona answers that end their turn within "
            f"train.max_seq_length"
        )
    if prompting and not prompting["beats"]:
        out.append(
            f"persona: the adapter does not beat prompting (ROUGE-L "
            f"{prompting['tuned_rouge_l']:.3f} against {prompting['base_rouge_l']:.3f}): "
            f"{prompting['advice']}"
        )
    return out or [
        "no round finished within guard.search_budget_s: raise it (seconds), or train "
        "on a faster machine"
    ]


def plot_frontier(points: list[dict], base_probe: float | None, spec: PersonaSpec, path: Path):
    """Persona score against probe change (points below the base model) and against the
    drift ratio, one colour per run; filled markers passed the gate, crosses failed it,
    dots are subset measurements the gate did not confirm."""
    from personatune.evaluate.report import pyplot, save_png

    plt = pyplot()
    g = spec.guard
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(dict.fromkeys(p["run"] for p in points)):
        ps = [p for p in points if p["run"] == run]
        c = colours[i % len(colours)]
        for ax, x in ((axes[0], lambda p: -p["probe_drop"]), (axes[1], lambda p: p["drift_ratio"])):
            for kind, marker in ((True, "o"), (False, "x"), (None, ".")):
                sel = [p for p in ps if p["passed"] is kind]
                xs, ys = [x(p) for p in sel], [p["persona_score"] for p in sel]
                ax.scatter(xs, ys, color=c, marker=marker, s=50)
            for p in ps:
                ax.annotate(str(p["step"]), (x(p), p["persona_score"]), fontsize=6, color=c)
        axes[0].plot([], [], color=c, label=run)
    axes[0].axvline(-g.probe_tolerance, ls="--", color="gray", label="gate limit")
    axes[0].axvline(0, ls=":", color="black")
    axes[0].set_xlabel("probe change vs base model (points)  →  better retention")
    axes[0].set_ylabel("persona score (mean P(persona), ↑)")
    axes[1].axvline(g.max_drift_ratio, ls="--", color="gray")
    axes[1].axvline(1, ls=":", color="black")
    axes[1].set_xlabel("drift ratio (tuned / base perplexity, ↓)")
    axes[0].legend(fontsize=7)
    title = f"{spec.name}: persona against retention (o passed, x failed, . unconfirmed)"
    if base_probe is not None:
        title += f"; base probe {base_probe:.1f}%"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def write_frontier(work: Path, spec: PersonaSpec, state: dict, chosen: dict | None) -> dict:
    """Gather the frontier of the refused run and every round into
    ``work/frontier.json`` (``{"points", "rounds", "chosen", "base_probe_accuracy",
    "probe_tolerance", "max_drift_ratio", "budget_s", "spent_s"}``) and plot it."""
    points = frontier_points(work, "refused run", {})
    for r in state["rounds"]:
        # a refused round keeps its work folder (.round-N.partial): read it from there
        points += frontier_points(_run_folder(work / SEARCH / r["name"]), r["name"], r["settings"])
    gate = read_json(work / "gate.json") if (work / "gate.json").exists() else {}
    frontier = {
        "points": points,
        "rounds": state["rounds"],
        "chosen": chosen,
        "base_probe_accuracy": gate.get("base_probe_accuracy"),
        "probe_tolerance": spec.guard.probe_tolerance,
        "max_drift_ratio": spec.guard.max_drift_ratio,
        "budget_s": spec.guard.search_budget_s,
        "spent_s": round(sum(r["seconds"] for r in state["rounds"]), 1),
    }
    write_json(work / FRONTIER_JSON, frontier)
    if points:
        plot_frontier(points, frontier["base_probe_accuracy"], spec, work / FRONTIER_PNG)
    return frontier


def search(spec: PersonaSpec, work: Path, refused: GateFailed, console: Console) -> dict:
    """Search for an adapter that passes the gate after ``refused`` (the refused run in
    ``work``), within ``guard.search_budget_s``; on success, make ``work`` the persona
    directory of the best round (its adapter, gate, spec and manifest).

    Returns:
        The frontier (:func:`write_frontier`), ``chosen`` set.

    Raises:
        GateFailed: no round passed within the budget; the message says which lever to
            change, and where the frontier is.
    """
    from personatune.train.trainer import train

    root = work / SEARCH
    root.mkdir(exist_ok=True)
    state_path = root / "search.json"
    state = read_json(state_path) if state_path.exists() else {"rounds": []}
    if "first_run" not in state:  # a resumed run's own timings are shorter: keep these
        state["first_run"] = _run_seconds(work)
        write_json(state_path, state)
    budget = spec.guard.search_budget_s
    done = {r["name"]: r for r in state["rounds"]}
    rounds = plan(spec, state["first_run"]["steps"] or 1)
    last, last_ratio = state["first_run"], spec.guard.preservation_ratio
    chosen = None
    console.print(
        f"[yellow]retention gate refused every checkpoint; searching for one that passes "
        f"(budget {budget:.0f} s, {len(rounds)} rounds at most)[/]"
    )
    for rnd in rounds:
        ratio = rnd.settings["guard.preservation_ratio"]
        if rnd.name in done:
            r = done[rnd.name]
        else:
            spent = sum(r["seconds"] for r in state["rounds"])
            every = rnd.settings["train.checkpoint_interval"]
            steps = state["first_run"]["steps"] * (1 + ratio) / (1 + spec.guard.preservation_ratio)
            est = estimate_seconds(last, last_ratio, ratio, math.ceil(steps / every))
            if spent + est > budget:
                console.print(
                    f"[yellow]search: {rnd.name} would take about {est:.0f} s, "
                    f"{budget - spent:.0f} s of the budget left: stopping[/]"
                )
                break
            console.print(f"[bold]search {rnd.name}[/]: {rnd.why} (about {est:.0f} s)")
            output = root / rnd.name
            resume = (partial_dir(output) / CHECKPOINTS).exists()
            start = time.time()
            passed = True
            try:
                train(round_spec(spec, rnd, output), resume=resume, console=console)
            except GateFailed:
                passed = False
            run = _run_folder(output)
            _prune(run)
            gate = read_json(run / "gate.json")
            r = {
                "name": rnd.name,
                "settings": rnd.settings,
                "why": rnd.why,
                "estimate_s": round(est, 1),
                "seconds": round(time.time() - start, 1),
                "passed": passed,
                "published": gate.get("published") if passed else None,
                "verdict": gate.get("verdict"),
                "prompting": gate.get("prompting"),
            }
            state["rounds"].append(r)
            write_json(state_path, state)
        last, last_ratio = _run_seconds(_run_folder(root / rnd.name)), ratio
        if r["passed"]:
            chosen = {"run": rnd.name, "step": r["published"], "settings": rnd.settings}
            break
    frontier = write_frontier(work, spec, state, chosen)
    if chosen is None:
        gate = read_json(work / "gate.json")
        prompting = next(
            (r["prompting"] for r in reversed(state["rounds"]) if r.get("prompting")),
            gate.get("prompting"),
        )
        lines = advice(spec, frontier["points"], prompting)
        raise GateFailed(
            f"{refused}\nThe search tried {len(state['rounds'])} more "
            f"run(s) in {frontier['spent_s']:.0f} s of {budget:.0f} s and none passed "
            f"(frontier: {work / FRONTIER_PNG}). What to change:\n- " + "\n- ".join(lines)
        )
    _adopt(spec, work, root / chosen["run"], frontier)
    console.print(
        f"[green]search: {chosen['run']} passed the gate at step {chosen['step']} "
        f"({frontier['spent_s']:.0f} s); its adapter is published[/]"
    )
    return frontier


def _adopt(spec: PersonaSpec, work: Path, run: Path, frontier: dict) -> None:
    """Make ``work`` the persona directory of the passing round ``run``: its adapter and
    gate, its settings as the spec (with this run's output folder), its manifest with the
    search recorded. The refused run's checkpoints stay, its log moves to
    ``search/refused_train_log.jsonl``."""
    for name in (ADAPTER_WEIGHTS, "adapter_config.json", "gate.json"):
        shutil.copyfile(run / name, work / name)
    shutil.copyfile(work / TRAIN_LOG, work / SEARCH / "refused_train_log.jsonl")
    shutil.copyfile(run / TRAIN_LOG, work / TRAIN_LOG)
    chosen = frontier["chosen"]
    final = round_spec(spec, Round(chosen["run"], chosen["settings"], ""), spec.output_path)
    final.guard.search_budget_s = spec.guard.search_budget_s
    write_text(work / SPEC, dump_spec(final))
    manifest = read_json(run / MANIFEST)
    manifest["search"] = {
        "chosen": chosen,
        "rounds": frontier["rounds"],
        "spent_s": frontier["spent_s"],
        "budget_s": frontier["budget_s"],
        "frontier": FRONTIER_JSON,
    }
    write_json(work / MANIFEST, manifest)
