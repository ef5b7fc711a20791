"""Does the forgetting guard pay? Train the same persona data with and without it, evaluate
each adapter with ``personatune eval``, and tabulate what the persona gained and cost.

Arms (``--arms``, comma-separated):

- ``off``: the persona data alone (``guard.enabled=false``): no self-distilled
  preservation data, no gate; the last step is published.
- ``R`` (a number, e.g. ``0.25``): the guard with ``guard.preservation_ratio=R``: the
  base model's own answers to general prompts mixed in at R rows per persona row,
  evaluation at every checkpoint and the retention gate. A run whose gate fails is
  recorded as failed and its last checkpoint is published with ``--no-gate`` (resumed,
  no retraining) so that its cost can still be measured.

Every arm uses the spec's seed, data split and hyperparameters; only the guard changes.
Each arm is trained into ``runs/ablation/<arm>`` and evaluated there; an arm whose
report already exists is reused with ``--reuse``. Results: a Markdown table and JSON in
``benchmarks/results/guard_ablation.{md,json}`` and a plot in ``docs/guard_ablation.png``.

    python benchmarks/guard_ablation.py --arms off,0,0.25,0.5
    python benchmarks/guard_ablation.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common  # sys.path and offline Hugging Face settings, before personatune

REPO = common.REPO
COLUMNS = [  # (report metric, header)
    ("adoption_rate", "adoption %"),
    ("probe_accuracy", "probe %"),
    ("drift_perplexity", "drift PPL"),
    ("stress_pass_rate", "stress %"),
    ("rouge_l", "ROUGE-L"),
    ("conditional_perplexity", "held-out PPL"),
    ("term_frequency", "term freq %"),
    ("repetition_rate", "rep-4 %"),
]


def arm_overrides(arm: str, out: Path) -> list[str]:
    """Spec overrides of one arm."""
    if arm == "off":
        return [f"output_dir={out}", "guard.enabled=false"]
    # no search: an arm measures one setting, and a refused arm is published as it is
    guard = ["guard.enabled=true", f"guard.preservation_ratio={float(arm)}"]
    return [f"output_dir={out}", *guard, "guard.search_budget_s=0"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    # One process per command, as a user runs them: memory is returned between arms.
    exe = Path(sys.executable).with_name("personatune")
    return subprocess.run([str(exe), *args], text=True, check=False)


def run_arm(spec_path: Path, arm: str, root: Path, reuse: bool, threads: int) -> dict:
    """Train and evaluate one arm with the ``personatune`` CLI; returns its results row."""
    out = root / arm
    if reuse and (out / "report.json").exists():
        return row(arm, json.loads((out / "report.json").read_text()), None)
    overrides = [*arm_overrides(arm, out), f"train.threads={threads}"]
    t = time.time()
    gate_failed = False
    done = _cli("train", str(spec_path), *overrides, "--overwrite")
    if done.returncode != 0 and arm != "off" and (root / f".{arm}.partial" / "gate.json").exists():
        gate_failed = True  # the gate refused: publish the last step to measure its cost
        done = _cli("train", str(spec_path), *overrides, "--resume", "--no-gate")
    if done.returncode != 0:
        raise SystemExit(f"arm {arm}: training failed (exit {done.returncode})")
    train_s = time.time() - t
    if _cli("eval", str(out), "--overwrite", "--threads", str(threads)).returncode != 0:
        raise SystemExit(f"arm {arm}: evaluation failed")
    report = json.loads((out / "report.json").read_text())
    return row(arm, report, {"wall_s": round(train_s, 1), "gate_failed": gate_failed})


def row(arm: str, report: dict, extra: dict | None) -> dict:
    """The table row of an arm from its report."""
    m = report["metrics"]
    guard = report.get("guard") or {}
    gate = guard.get("gate") or {}
    training = report.get("training") or {}
    r = {
        "arm": arm,
        "preservation_ratio": None if arm == "off" else float(arm),
        "gate": arm != "off",
        "gate_passed": None if arm == "off" else gate.get("chosen") is not None,
        "published_step": gate.get("published", training.get("steps")),
        "steps": training.get("steps"),
        "preservation_rows": guard.get("preservation_rows", 0),
        "base": {k: m[k]["base"] for k in m},
        "tuned": {k: m[k]["tuned"] for k in m},
        "drift_ratio": report["drift_ratio"],
        "probe_drop_points": report["probe_drop_points"],
        "classifier_cv_error": report["classifier"]["cv_error"],
        "train_seconds": training.get("train_seconds"),
        "guard_prepare_s": guard.get("prepare_s"),
        "guard_eval_s": guard.get("eval_seconds"),
        "gate_s": gate.get("gate_s"),
        "eval_seconds": report["timings_s"]["total"],
    }
    if r["gate_passed"] is False:
        # Refused by the gate, then published by `--resume --no-gate`: the report's training
        # and guard timings are those of the resume, not of the run.
        r.update(train_seconds=None, guard_prepare_s=None, guard_eval_s=None, gate_s=None)
    if extra:
        r.update(extra)
    return r


def arm_name(arm: str) -> str:
    """A readable name of an arm."""
    if arm == "off":
        return "no guard"
    return "gate, no preservation" if float(arm) == 0 else f"guard, ratio {arm}"


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table."""
    head = ["arm", "preservation rows", "published step", *[c[1] for c in COLUMNS]]
    head += ["probe change (pts)", "drift ratio", "gate"]
    base = rows[0]["base"]
    table = [["base model", "–", "–", *(_f(base[k]) for k, _ in COLUMNS), 0, "1.00", "–"]]
    for r in rows:
        gate = "pass" if r["gate_passed"] else "FAIL (last step published with --no-gate)"
        table.append(
            [arm_name(r["arm"]), r["preservation_rows"], r["published_step"]]
            + [_f(r["tuned"][k]) for k, _ in COLUMNS]
            + [f"{-r['probe_drop_points']:+.1f}", f"{r['drift_ratio']:.2f}"]
            + ["–" if r["arm"] == "off" else gate]
        )
    timing = [
        "",
        (
            "Wall-clock seconds (2 CPU cores; other jobs may have run at the same "
            "time, so compare within a column with care):"
        ),
        "",
        "| arm | train s | guard prepare s | guard eval s | gate s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["gate_passed"] is False:
            timing.append(
                f"| {r['arm']} | refused by the gate, then published with --resume "
                f"--no-gate: timings not comparable |||| {_f(r.get('eval_seconds'))} |"
            )
            continue
        timing.append(
            f"| {r['arm']} | {_f(r.get('train_seconds'))} | "
            f"{_f(r.get('guard_prepare_s'))} | {_f(r.get('guard_eval_s'))} | "
            f"{_f(r.get('gate_s'))} | {_f(r.get('eval_seconds'))} |"
        )
    return (
        "# Forgetting guard ablation\n\n"
        f"Persona `{meta['spec']}`; base model `{meta['base_model']}`; greedy decoding; "
        f"{meta['machine']}. Generated by `python benchmarks/guard_ablation.py "
        f"--arms {meta['arms']}`.\n\n"
        "All arms share the data, seed and hyperparameters; only the guard changes. "
        "Adoption: share of held-out general prompts answered in persona (classifier). "
        "Probe: factual probe accuracy, persona system prompt. Drift PPL: perplexity on "
        "the base model's own greedy answers to held-out general prompts (no system "
        "prompt). Stress: automatic checks of seed system 1's stress prompts.\n\n"
        + common.markdown_table(head, table)
        + "\n"
        + "\n".join(timing)
        + "\n"
        + (f"\n{meta['note']}\n" if meta.get("note") else "")
    )


def _f(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: adoption, probe accuracy and stress pass rate per arm (percent,
    base model as a dashed line), and the drift ratio with the gate's limit."""
    names = [
        "no guard"
        if r["arm"] == "off"
        else "gate only"
        if float(r["arm"]) == 0
        else f"guard\nratio {r['arm']}"
        for r in rows
    ]
    fig, axes = common.figure(1, 4, figsize=(14, 3.6))
    panels = [
        ("adoption_rate", "persona adoption % ↑"),
        ("probe_accuracy", "factual probe % ↑"),
        ("stress_pass_rate", "stress checks % ↑"),
        ("drift_perplexity", "drift perplexity ↓"),
    ]
    for ax, (key, title) in zip(axes, panels):
        vals = [r["tuned"][key] for r in rows]
        colours = [
            "tab:red" if r["arm"] == "off" or not r["gate_passed"] else "tab:green" for r in rows
        ]
        ax.bar(names, vals, color=colours)
        ax.axhline(rows[0]["base"][key], ls="--", color="gray", label="base model")
        if key == "drift_perplexity":
            ax.axhline(1.5 * rows[0]["base"][key], ls=":", color="black", label="gate limit")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="upper right" if key == "drift_perplexity" else "lower right")
    fig.suptitle("forgetting guard ablation: same data, with and without the guard", fontsize=11)
    common.save_plot(fig, path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=REPO / "examples/pirate/persona.yaml")
    ap.add_argument(
        "--arms",
        default="off,0,0.1,0.25,0.5",
        help="comma-separated: off (no guard) or preservation ratios with the gate",
    )
    ap.add_argument("--runs", type=Path, default=REPO / "runs/ablation")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/guard_ablation")
    ap.add_argument("--plot", type=Path, default=REPO / "docs/guard_ablation.png")
    ap.add_argument("--reuse", action="store_true", help="reuse arms that have a report")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per run (train.threads); 0 keeps PyTorch's default",
    )
    ap.add_argument(
        "--plot-only",
        action="store_true",
        help="rewrite the table and the plot from the JSON results",
    )
    ap.add_argument("--note", default="", help="a paragraph to add under the tables")
    args = ap.parse_args(argv)
    if args.plot_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        data["meta"]["note"] = args.note or data["meta"].get("note", "")
        common.write_markdown(args.out.with_suffix(".md"), markdown(data["rows"], data["meta"]))
        plot(data["rows"], args.plot)
        return 0
    from personatune.models import resolve_ref

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a != "off":
            float(a)  # fail before any work on a bad arm
    rows = []
    for arm in arms:
        print(f"== arm {arm}", file=sys.stderr, flush=True)
        rows.append(run_arm(args.spec, arm, args.runs, args.reuse, args.threads))
    from personatune.config import load_spec

    spec = load_spec(args.spec)
    meta = {
        "spec": str(args.spec.relative_to(REPO) if args.spec.is_relative_to(REPO) else args.spec),
        "base_model": resolve_ref(spec.model.name, spec.model.revision, spec.base_dir).name,
        "arms": args.arms,
        "machine": common.describe(common.machine_info()),
        "lr": spec.train.learning_rate,
        "epochs": spec.train.epochs,
        "note": args.note,
    }
    common.write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    common.write_markdown(args.out.with_suffix(".md"), markdown(rows, meta))
    plot(rows, args.plot)
    print(markdown(rows, meta))
    shutil.rmtree(args.runs / ".tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
