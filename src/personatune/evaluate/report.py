"""Write the report card: ``report.json``, and ``report.html`` with plots (the training
loss curve, base-against-tuned bars for every metric, persona adoption by conversation
turn) and side-by-side answer tables."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from pathlib import Path

from personatune.evaluate.card import probe_change
from personatune.io import read_jsonl, write_json, write_text

PLOTS = ("report_loss.png", "report_metrics.png", "report_turns.png")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> bytes:
    """Write ``fig`` as a PNG through a temporary file and a rename, close it, and return
    the PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    data = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def plot_loss(log: list[dict], path: Path) -> bytes | None:
    """Training loss per optimizer step (and eval loss), with the guard's metrics at each
    checkpoint on a second panel when the run logged them. Returns the PNG bytes, or
    None when the log has no loss."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    if not train:
        return None
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    guard = [(r["step"], r["guard"]) for r in log if "guard" in r]
    fig, axes = plt.subplots(1, 2 if guard else 1, figsize=(11 if guard else 6.5, 3.8))
    ax = axes[0] if guard else axes
    ax.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training loss")
    ax.legend()
    if guard:
        g = axes[1]
        steps = [s for s, _ in guard]
        g.plot(steps, [100 * m["adoption_rate"] for _, m in guard], "o-", label="adoption rate %")
        g.plot(steps, [m["probe_accuracy"] for _, m in guard], "s-", label="probe accuracy %")
        g.set_xlabel("optimizer step (0 = base model)")
        g.set_ylabel("percent")
        g2 = g.twinx()
        g2.plot(
            steps, [m["drift_ratio"] for _, m in guard], "^--", color="tab:red", label="drift ratio"
        )
        g2.set_ylabel("drift perplexity ratio")
        lines = g.get_legend_handles_labels()
        lines2 = g2.get_legend_handles_labels()
        g.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
        g.set_title("guard metrics on fixed subsets, per checkpoint")
    fig.tight_layout()
    return save_png(fig, path)


def plot_turns(conversations: dict, path: Path) -> bytes | None:
    """Persona adoption (left) and questions answered correctly (right) per user turn
    of the scripted conversations, base against tuned, in percent. Returns the PNG
    bytes, or None when there are no turns."""
    plt = pyplot()
    if not conversations or not conversations["base"]["adoption_by_turn"]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = (("adoption_by_turn", "persona adoption %"), ("correct_by_turn", "correct %"))
    for ax, (key, ylabel) in zip(axes, panels):
        for side, style, colour in (("base", "o--", "tab:gray"), ("tuned", "s-", "tab:orange")):
            vals = conversations[side][key]
            turns = [i + 1 for i, v in enumerate(vals) if v is not None]
            ax.plot(turns, [v for v in vals if v is not None], style, color=colour, label=side)
        ax.set_xlabel("user turn")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-5, 105)
        ax.set_xticks(range(1, len(conversations["base"][key]) + 1))
        ax.legend(fontsize=8)
    axes[0].set_title("persona adoption by turn (system prompt, own answers in context)")
    axes[1].set_title("questions answered correctly by turn")
    for ax in axes:
        ax.title.set_fontsize(9)
    fig.tight_layout()
    return save_png(fig, path)


def plot_metrics(metrics: dict, path: Path) -> bytes:
    """One small bar chart per metric, base against tuned, titled with the metric and
    whether higher or lower is better. Returns the PNG bytes."""
    plt = pyplot()
    keys = list(metrics)
    cols = 5
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        m = metrics[key]
        vals = [m["base"], m["tuned"]]
        shown = [0 if v is None or math.isnan(v) else v for v in vals]
        ax.bar(["base", "tuned"], shown, color=["tab:gray", "tab:orange"])
        arrow = {True: " ↑", False: " ↓"}.get(m["higher_is_better"], "")
        # long labels ("identity questions answered in persona, ...") ran into the next
        # panel's title: wrap them to the panel's width
        ax.set_title(textwrap.fill(f"{m['label']}{arrow}", 40), fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, shown[i], _fmt(v, m["unit"]), ha="center", va="bottom", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.2)
        finite = [v for v in vals if v is not None and not math.isnan(v)] or [0]
        low, top = min(0, *finite), max(finite)
        ax.set_ylim(low * 1.25, top * 1.25 if top > 0 else 1)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle("base vs tuned (↑ higher is better, ↓ lower is better)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def _fmt(v, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.3g}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}"
    return str(v)


def _cell(v) -> str:
    """A table cell: [base, tuned] pairs as "base / tuned", answer keys joined."""
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return " | ".join(v)
        return " / ".join(
            "✓" if x is True else "✗" if x is False else "–" if x is None else f"{x:.2f}" for x in v
        )
    return _fmt(v)


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return f"<p><em>no {html.escape(alt)}</em></p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _answers_table(rows: list[dict], first: str, extra: list[tuple[str, str]]) -> str:
    head = "".join(
        f"<th>{html.escape(h)}</th>" for h in [first, *[e[1] for e in extra], "base", "tuned"]
    )
    body = []
    for r in rows:
        cells = [html.escape(str(r[first]))]
        cells += [html.escape(_cell(r.get(k))) for k, _ in extra]
        for side in ("base", "tuned"):
            a = r[side]
            cut = "" if a["finished"] else ' <span class="cut">[cut at limit]</span>'
            cells.append(html.escape(a["text"]) + cut)
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


#: The answer tables of the page: title, key in ``report["answers"]``, first column, and
#: the extra columns as ``(row key, heading)``; a section the report lacks is left out.
SECTIONS = (
    ("General prompts (adoption)", "general", "prompt", [("p_persona", "P(persona) base, tuned")]),
    ("Held-out persona examples", "heldout", "prompt", [("reference", "reference")]),
    ("Stress prompts", "stress", "prompt", [("kind", "kind"), ("passed", "passed base, tuned")]),
    ("Factual probe", "probe", "question",
     [("answers", "answer key"), ("correct", "correct base, tuned")]),
    ("Identity questions", "identity", "prompt",
     [("category", "category"), ("held", "in persona, base, tuned")]),
    ("Scripted conversations", "conversations", "prompt",
     [("kind", "kind"), ("in_persona", "in persona, base, tuned")]),
)  # fmt: skip

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left;
max-width:420px;overflow-wrap:anywhere}
th{background:#f3f3f3}.ok{color:#080}.bad{color:#b00}.cut{color:#b60;font-size:11px}
img{max-width:100%}"""


def render_html(
    report: dict, loss_png: bytes | None, metrics_png: bytes, turns_png: bytes | None = None
) -> str:
    """The report as one self-contained HTML page (plots inlined as PNG data URLs; the
    adoption-by-turn plot also links its file, ``report_turns.png``, beside the page)."""
    e = html.escape
    rows = []
    for m in report["metrics"].values():
        better = m["higher_is_better"]
        delta = None if m["base"] is None or m["tuned"] is None else m["tuned"] - m["base"]
        good = None if better is None or delta is None else (delta >= 0) == better
        cls = "" if good is None or delta == 0 else ("ok" if good else "bad")
        rows.append(
            f"<tr><td>{e(m['group'])}</td><td>{e(m['label'])}</td>"
            f"<td>{_fmt(m['base'], m['unit'])}</td><td>{_fmt(m['tuned'], m['unit'])}</td>"
            f"<td class='{cls}'>{_fmt(delta)}</td></tr>"
        )
    targets = "".join(
        f"<li class='{'ok' if v else 'bad'}'>{e(k)}: {'pass' if v else 'FAIL'}</li>"
        for k, v in report["targets"].items()
    )
    clf = report["classifier"]
    g = (report.get("guard") or {}).get("gate")
    gate_html = ""
    if g:
        checked = "".join(
            f"<tr><td>{c['step']}</td><td>{_fmt(c.get('persona_score'))}</td>"
            f"<td>{_fmt(c.get('probe_accuracy'))}</td><td>{_fmt(c.get('drift_ratio'))}</td>"
            f"<td>{'pass' if c['passed'] else e('; '.join(c['reasons']))}</td></tr>"
            for c in g.get("checked", [])
        )
        gate_html = (
            f"<h2>Retention gate</h2><p>{e(g.get('verdict', ''))}</p>"
            "<table><tr><th>step</th><th>persona score</th><th>probe %</th>"
            f"<th>drift ratio</th><th>verdict</th></tr>{checked}</table>"
        )
    ans = report["answers"]
    turns_html = ""
    if turns_png:
        turns_html = (
            "<h2>Long conversations</h2><p>Persona adoption and correctness per user turn "
            "of the scripted conversations, each answered with the model's own earlier "
            'answers in the context (<a href="report_turns.png">report_turns.png</a>).</p>'
            + _img(turns_png, "adoption by turn")
        )
    identity_html = ""
    if report.get("identity"):
        idn = report["identity"]
        identity_html = (
            "<p>Identity: the base model's names and makers, which a persona must not "
            f"claim: {e(', '.join(idn['base_names']) or 'none found')} "
            f"({e('; '.join(idn['sources']))}).</p>"
        )
    degen_html = ""
    if report.get("degeneration_failures"):
        failures = e("; ".join(report["degeneration_failures"]))
        degen_html = f"<p class='bad'>Degeneration against the base model: {failures}</p>"
    details = "".join(
        f"<details{' open' if i == 0 else ''}><summary><b>{e(title)}</b> "
        f"({len(ans[key])})</summary>{_answers_table(ans[key], first, extra)}</details>"
        for i, (title, key, first, extra) in enumerate(s for s in SECTIONS if s[1] in ans)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>personatune report: {e(report["persona"])}</title><style>{CSS}</style></head><body>
<h1>Report card: {e(report["persona"])}</h1><p>{e(report["description"])}</p>
<p>Base model <code>{e(report["base_model"]["reference"])}</code>; greedy decoding;
{report["data"]["heldout_examples"]} held-out persona examples,
{report["data"]["general_prompts"]} general prompts, {report["data"]["probe_questions"]} probe
questions ({report["data"]["probe_seen_in_training"]} dropped as seen in training),
{report["data"]["stress_prompts"]} stress prompts.</p>
<h2>Targets</h2><ul>{targets}</ul>
<p>{e(probe_change(report)).capitalize()} (tuned − base); drift ratio
{_fmt(report["drift_ratio"])}.</p>
<h2>Metrics</h2><table><tr><th>group</th><th>metric</th><th>base</th><th>tuned</th>
<th>tuned − base</th></tr>{"".join(rows)}</table>
{degen_html}{identity_html}
{_img(metrics_png, "metrics plot")}
{turns_html}
<p>Adoption classifier: {e(clf["method"])}, {clf["cv_folds"]}-fold cross-validated error
{100 * clf["cv_error"]:.1f}% on {clf["n_persona"]} persona and {clf["n_plain"]} base answers.</p>
{gate_html}
<h2>Training</h2>{_img(loss_png, "loss curve")}
<h2>Answers, side by side</h2>{details}
<p><small>timings (s): {e(json.dumps(report["timings_s"]))}</small></p>
</body></html>"""


def write_report(report: dict, out_dir: Path, train_log: Path) -> None:
    """Write ``report.json``, ``report.html`` and the plot PNGs to ``out_dir``, each
    through a temporary file and a rename."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loss = plot_loss(read_jsonl(train_log) if train_log.exists() else [], out_dir / PLOTS[0])
    bars = plot_metrics(report["metrics"], out_dir / PLOTS[1])
    turns = plot_turns(report.get("conversations") or {}, out_dir / PLOTS[2])
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.html", render_html(report, loss, bars, turns))
