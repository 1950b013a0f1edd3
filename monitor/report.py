"""People-facing views of the monitor's figures: a table and three plots, as one HTML page.

The same renderer serves the live dashboard (``GET /``) and writes the demo's report file, so what a user sees
in the browser and in the report cannot drift apart. Plots are SVG from matplotlib, inlined, so the page needs no
script library from the internet.
"""

from __future__ import annotations

import html
import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .summary import DEPTHS  # noqa: E402

COLORS = {"payload": "#4C72B0", "message": "#DD8452", "tcp": "#55A868"}


def _svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "splitinfer", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _tags(summary: dict) -> list[str]:
    return list(summary["tags"])


def plot_bytes_by_tag(summary: dict) -> str:
    tags = _tags(summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tags) + 2), 3.6))
    width = 0.27
    for j, depth in enumerate(DEPTHS):
        vals = [(summary["tags"][t][depth] or {}).get("mean", 0.0) for t in tags]
        ax.bar([i + (j - 1) * width for i in range(len(tags))], vals, width, label=depth, color=COLORS[depth])
    ax.set_xticks(range(len(tags)), tags, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean bytes per image")
    ax.set_title("Bytes per image by tag (payload / gRPC message / TCP)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def _order(tags: set[str], order: list[str] | None) -> list[str]:
    """The summary's tag order (as in the table and the bar plot), then any others alphabetically."""
    first = [t for t in (order or []) if t in tags]
    return first + sorted(tags - set(first))


def plot_distribution(records: list[dict], order: list[str] | None = None) -> str:
    by_tag: dict[str, list[int]] = defaultdict(list)
    for r in records:
        by_tag[r["tag"] or "(untagged)"].append(r["message_bytes"])
    tags = _order(set(by_tag), order)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tags) + 2), 3.6))
    if tags:
        ax.boxplot([by_tag[t] for t in tags], showfliers=False)
        ax.set_xticks(range(1, len(tags) + 1), tags, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("message bytes per request")
    ax.set_title("Distribution of request sizes by tag")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def plot_over_time(records: list[dict], order: list[str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(8.0, 3.2))
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_tag[r["tag"] or "(untagged)"].append(r)
    t0 = min((r["ts"] for r in records), default=0.0)
    for tag in _order(set(by_tag), order):
        rs = by_tag[tag]
        ax.scatter([r["ts"] - t0 for r in rs], [r["message_bytes"] for r in rs], s=4, label=tag)
    ax.set_xlabel("seconds since the first record shown")
    ax.set_ylabel("message bytes")
    ax.set_title("Request sizes over time")
    if by_tag:
        ax.legend(fontsize=7, markerscale=3, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, the data
    ax.grid(alpha=0.3)
    return _svg(fig)


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def table_rows(summary: dict) -> list[dict]:
    """The figures of the people-facing table (also printed by the demo)."""
    rows = []
    for tag, e in summary["tags"].items():
        rows.append({"tag": tag, "images": e["images"], "errors": e["errors"],
                     "payload": (e["payload"] or {}).get("mean"), "message": (e["message"] or {}).get("mean"),
                     "tcp": (e["tcp"] or {}).get("mean"), "p95_message": (e["message"] or {}).get("p95"),
                     "payload_delta_pct": e["payload_delta_pct"],
                     "delta_pct": e["tcp_delta_pct"] if e["tcp_delta_pct"] is not None else e["message_delta_pct"],
                     "accuracy": e["accuracy"]})
    return rows


def render_table(summary: dict) -> str:
    head = ("tag", "images", "errors", "payload B", "Δ% payload", "message B", "TCP B", "p95 message B",
            "Δ% wire", "accuracy")
    out = ["<table id='summary'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in table_rows(summary):
        cells = (html.escape(r["tag"]), str(r["images"]), str(r["errors"]), _fmt(r["payload"]),
                 _fmt(r["payload_delta_pct"], "+.1f", "%"), _fmt(r["message"]),
                 _fmt(r["tcp"]), _fmt(r["p95_message"]), _fmt(r["delta_pct"], "+.1f", "%"),
                 _fmt(None if r["accuracy"] is None else 100 * r["accuracy"], ".1f", "%"))
        out.append(f"<tr data-tag='{html.escape(r['tag'], quote=True)}'>" + "".join(f"<td>{c}</td>" for c in cells)
                   + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}figure{margin:1rem 0}svg{max-width:100%;height:auto}
.note{color:#555;font-size:.9rem}
"""


def render_page(summary: dict, records: list[dict], title: str, notes: list[str] | None = None,
                refresh_s: int | None = None) -> str:
    """A complete HTML page; ``refresh_s`` makes it a live dashboard that re-fetches itself."""
    conn = summary["connections"]
    cal = summary["calibration"]
    facts = [f"{summary['records']} requests recorded; {conn['connections']} relayed TCP connections "
             f"({conn['bytes_up']} B edge→server, {conn['bytes_down']} B server→edge; "
             f"{conn['idle_bytes_up']} B up on connections that carried no inference request)."]
    if cal:
        facts.append(f"Framing calibration: {cal['per_request_bytes']:.1f} B per request + "
                     f"{cal['per_connection_bytes']:.0f} B per connection over the message bytes "
                     f"({cal['requests']} calibration requests).")
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p class='note'>{html.escape(n)}</p>" for n in (notes or [])),
            *(f"<p class='note'>{html.escape(f)}</p>" for f in facts), render_table(summary),
            "<figure id='plot-bytes-by-tag'>", plot_bytes_by_tag(summary), "</figure>",
            "<figure id='plot-distribution'>", plot_distribution(records, _tags(summary)), "</figure>",
            "<figure id='plot-over-time'>", plot_over_time(records, _tags(summary)), "</figure>"]
    script = ""
    if refresh_s:
        script = (f"<script>setInterval(async()=>{{const r=await fetch(location.pathname+'?fragment=1');"
                  f"if(r.ok)document.getElementById('content').innerHTML=await r.text();}},{refresh_s * 1000});"
                  "</script>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            + STYLE + "</style></head><body><div id='content'>" + "".join(body) + "</div>" + script
            + "</body></html>")


def render_fragment(summary: dict, records: list[dict], title: str) -> str:
    page = render_page(summary, records, title)
    return page[page.index("<div id='content'>") + len("<div id='content'>"):page.rindex("</div>")]
