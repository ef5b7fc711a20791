"""The guard on by default, measured: train each persona with the forgetting guard (and
its search when the gate refuses every checkpoint), then tabulate what was published,
the gate's verdict, the comparison with the prompted base model, the search's frontier
and what the guard cost in time (wall-clock and CPU seconds: the CPU seconds of a
process do not grow when other jobs share the cores, its wall-clock seconds do).

    python benchmarks/guard_search.py --persona pirate=examples/pirate/persona.yaml \\
        --persona sherlock=examples/sherlock/persona.yaml --threads 1
    python benchmarks/guard_search.py --collect pirate=runs/pirate   # runs trained before

Each ``--persona`` is trained with ``personatune train SPEC train.threads=N --overwrite``
into ``--runs/NAME``; ``--collect NAME=DIR`` reads a run trained by hand (its persona
directory, or its unfinished ``.DIR.partial`` folder when the gate refused it). With
``--eval``, ``personatune eval`` then scores each published persona, base model (with
the same system prompt) against tuned. Results: ``benchmarks/results/guard_search.{json,md}``
and each run's frontier plot copied to ``benchmarks/results/guard_search_NAME.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

#: report-card rows of the comparison with prompting (base = the prompted base model)
CARD_ROWS = [
    ("adoption_rate", "persona adoption %"),
    ("identity_rate", "identity kept %"),
    ("turn8_adoption", "adoption at turn 8 %"),
    ("probe_accuracy", "factual probe %"),
    ("drift_perplexity", "drift perplexity"),
    ("rouge_l", "ROUGE-L (held-out)"),
]


def _exe() -> str:
    return str(Path(sys.executable).with_name("personatune"))


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(name: str, spec: Path, runs: Path, threads: int, extra: list[str]) -> dict:
    """Train one persona with the guard; returns the command, exit status and seconds."""
    out = runs / name
    cmd = [_exe(), "train", str(spec), f"output_dir={out.resolve()}", *extra, "--overwrite"]
    if threads:
        cmd.insert(3, f"train.threads={threads}")
    t, cpu = time.time(), _child_cpu()
    done = subprocess.run(cmd, check=False)
    return {
        "command": " ".join(["personatune", *cmd[1:]]),
        "exit": done.returncode,
        "wall_s": round(time.time() - t, 1),
        "cpu_s": round(_child_cpu() - cpu, 1),
        "dir": str(out),
    }


def _folder(out: Path) -> tuple[Path, bool]:
    """The run's folder and whether it was published."""
    if (out / "adapter_model.safetensors").exists():
        return out, True
    return out.parent / f".{out.name}.partial", False


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def collect(name: str, out: Path, run: dict | None = None) -> dict:
    """One row of results from a run folder (published or refused)."""
    folder, published = _folder(Path(out))
    manifest, gate = _read(folder / "persona.json"), _read(folder / "gate.json")
    frontier = _read(folder / "frontier.json")
    guard = manifest.get("guard") or {}
    training = manifest.get("training") or {}
    search = manifest.get("search") or {}
    rounds = frontier.get("rounds") or search.get("rounds") or []
    spent = frontier.get("spent_s") or search.get("spent_s") or 0.0
    plot = None
    if (folder / "frontier.png").exists():
        plot = common.RESULTS / f"guard_search_{name}.png"
        shutil.copyfile(folder / "frontier.png", plot)
    guard_s = sum(guard.get(k) or 0 for k in ("prepare_s", "eval_seconds")) + (
        (guard.get("gate") or {}).get("gate_s") or 0
    )
    guard_cpu = sum(guard.get(k) or 0 for k in ("prepare_cpu_s", "eval_cpu_seconds")) + (
        (guard.get("gate") or {}).get("gate_cpu_s") or 0
    )
    log = folder / "train_log.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    report = _read(folder / "report.json")
    card = {}
    for key, _ in CARD_ROWS:
        m = (report.get("metrics") or {}).get(key)
        if m:
            card[key] = {"base": m["base"], "tuned": m["tuned"]}
    return {
        "name": name,
        "folder": str(folder),
        "published": published,
        "published_step": gate.get("published"),
        "verdict": gate.get("verdict"),
        "checked": gate.get("checked", []),
        "base_probe_accuracy": gate.get("base_probe_accuracy"),
        "prompting": gate.get("prompting"),
        "steps": training.get("steps"),
        # a run still training has no persona.json yet: how far its log got
        "steps_logged": sum("loss" in r for r in rows),
        "checkpoints_measured": sum("guard" in r and r["step"] > 0 for r in rows),
        "finished": bool(gate),
        "train_s": training.get("train_seconds"),
        "train_cpu_s": training.get("train_cpu_seconds"),
        "guard_prepare_s": guard.get("prepare_s"),
        "guard_eval_s": guard.get("eval_seconds"),
        "gate_s": (guard.get("gate") or {}).get("gate_s"),
        "guard_s": round(guard_s, 1),
        "guard_cpu_s": round(guard_cpu, 1),
        "preservation_rows": guard.get("preservation_rows"),
        "search_rounds": rounds,
        "search_s": spent,
        "search_chosen": frontier.get("chosen") or search.get("chosen"),
        "frontier_points": len(frontier.get("points") or []),
        "frontier_plot": str(plot.relative_to(common.REPO)) if plot else None,
        "card": card,
        "run": run,
    }


def _f(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(rows: list[dict], meta: dict) -> str:
    """The results as Markdown tables."""
    head = ["persona", "published", "gate", "train s (CPU s)", "guard s (CPU s)",
            "guard / train (CPU)", "search rounds", "search s"]  # fmt: skip
    body = []
    for r in rows:
        if not r["finished"]:
            state = (
                f"unfinished: {r['steps_logged']} steps trained, "
                f"{r['checkpoints_measured']} checkpoints measured"
            )
            body.append([r["name"], state, *["–"] * 6])
            continue
        cpu = r.get("train_cpu_s") and r.get("guard_cpu_s")
        body.append(
            [
                r["name"],
                f"step {r['published_step']}" if r["published"] else "no",
                (r["verdict"] or "–").replace("|", "/"),
                f"{_f(r['train_s'])} ({_f(r['train_cpu_s'])})",
                f"{_f(r['guard_s'])} ({_f(r['guard_cpu_s'])})",
                f"{r['guard_cpu_s'] / r['train_cpu_s']:.2f}" if cpu else "–",
                len(r["search_rounds"]),
                _f(r["search_s"]),
            ]
        )
    cmp_head = ["persona", "checkpoint", "prompts", "references", "prompted base ROUGE-L",
                "adapter ROUGE-L", "beats prompting"]  # fmt: skip
    cmp_rows = [
        [
            r["name"],
            c["step"],
            c["prompts"],
            c["references"],
            f"{c['base_rouge_l']:.3f}",
            f"{c['tuned_rouge_l']:.3f}",
            "yes" if c["beats"] else f"no: {c['advice']}",
        ]  # fmt: skip
        for r in rows
        if (c := r.get("prompting"))
    ]
    text = [
        "# The guard on by default: what it publishes and what it costs",
        "",
        f"Machine: {meta['machine']}, bf16 instructions "
        f"{', '.join(meta.get('bf16_matmul_isa') or ['none'])}. Load average at the start: "
        f"{meta.get('load_average')}. Generated by `{meta['command']}`.",
        "",
        common.markdown_table(head, body),
        "",
        "## Against the prompted base model (held-out persona references)",
        "",
        common.markdown_table(cmp_head, cmp_rows) if cmp_rows else "(no comparison recorded)",
    ]
    search_head = ["round", "what changed", "estimate s", "seconds", "passed", "verdict"]
    for r in rows:
        if r["search_rounds"]:
            search = [
                [
                    x["name"],
                    x["why"],
                    x["estimate_s"],
                    x["seconds"],
                    x["passed"],
                    (x.get("verdict") or "").replace("|", "/"),
                ]  # fmt: skip
                for x in r["search_rounds"]
            ]
            text += ["", f"## Search: {r['name']}", "", common.markdown_table(search_head, search)]
            if r["frontier_plot"]:
                text += ["", f"![frontier]({Path(r['frontier_plot']).name})"]
        if r["card"]:
            card = [
                [label, _f(r["card"][k]["base"], "{:.3g}"), _f(r["card"][k]["tuned"], "{:.3g}")]
                for k, label in CARD_ROWS
                if k in r["card"]
            ]
            text += [
                "",
                f"## Report card: {r['name']} (base = base model with the system prompt)",
                "",
                common.markdown_table(["metric", "prompted base", "adapter"], card),
            ]
    if meta.get("note"):
        text += ["", meta["note"]]
    return "\n".join(text)


def _pairs(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item}: expected NAME=PATH")
        out.append((name, Path(path)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--persona", action="append", default=[], help="NAME=SPEC to train")
    ap.add_argument("--collect", action="append", default=[], help="NAME=DIR trained before")
    ap.add_argument("--runs", type=Path, default=common.REPO / "runs/guard_search")
    ap.add_argument("--threads", type=int, default=0, help="train.threads (0: the probe picks)")
    ap.add_argument("--eval", action="store_true", help="personatune eval each published run")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "guard_search")
    ap.add_argument("--note", default="", help="a paragraph under the tables")
    args = ap.parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--note" in shown[:-1]:  # the note is printed under the tables, not in the command
        shown[shown.index("--note") + 1] = '"..."'
    meta = {
        "command": "python benchmarks/guard_search.py " + " ".join(shown),
        **common.machine_info(),
        "note": args.note,
    }
    meta["machine"] = common.describe(meta)
    rows = []
    for name, spec in _pairs(args.persona):
        run = train(name, spec, args.runs, args.threads, [])
        rows.append(collect(name, args.runs / name, run))
    rows += [collect(name, path) for name, path in _pairs(args.collect)]
    if args.eval:
        for r in rows:
            if r["published"]:
                cmd = [_exe(), "eval", r["folder"], "--overwrite"]
                subprocess.run(cmd, check=False)
                r.update(card=collect(r["name"], Path(r["folder"]))["card"])
    common.write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    common.write_markdown(args.out.with_suffix(".md"), markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
