"""Turns a `make bench` results file into benches/RESULTS.md.

Only the part between the `generated` markers is rewritten; notes written by
hand around it (the profile, what was optimised) are kept.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from datetime import datetime, timezone

BEGIN = "<!-- generated:begin (benches/report.py rewrites this part) -->"
END = "<!-- generated:end -->"


def load(path):
    """Values per (scenario, system, metric) as (repetition, value) pairs, and the repetition count."""
    values = defaultdict(list)
    runs = set()
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                values[(r["scenario"], r["system"], r["metric"])].append((r["run"], r["value"]))
                runs.add(r["run"])
    return values, len(runs)


class Results:
    def __init__(self, values):
        self.by_run = values
        self.values = {key: [v for _, v in pairs] for key, pairs in values.items()}

    def get(self, scenario, system, metric):
        return self.values.get((scenario, system, metric), [])

    def median(self, scenario, system, metric):
        v = self.get(scenario, system, metric)
        return statistics.median(v) if v else None

    def cell(self, scenario, system, metric, digits=0):
        v = self.get(scenario, system, metric)
        if not v:
            return "not measured"
        f = f"{{:,.{digits}f}}"
        return f"{f.format(min(v))} / **{f.format(statistics.median(v))}** / {f.format(max(v))}"

    def paired(self, numerator, denominator):
        """The ratio within each repetition that measured both (same minutes, same host speed)."""
        bottom = dict(self.by_run.get(denominator, []))
        return [v / bottom[run] for run, v in self.by_run.get(numerator, []) if bottom.get(run)]


def fmt_spread(ratios, digits=2):
    if not ratios:
        return "n/a"
    return f"{min(ratios):.{digits}f} / {statistics.median(ratios):.{digits}f} / {max(ratios):.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r, digits=2):
    return "n/a" if r is None else f"{r:.{digits}f}×"


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    def git(*args):
        try:
            return subprocess.check_output(["git", *args], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return {
        "nproc": os.cpu_count(),
        "memory": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "commit": git("rev-parse", "--short", "HEAD") + dirty,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def criterion_rows(folder):
    rows = []
    if not folder or not os.path.isdir(folder):
        return rows
    for dirpath, _, files in os.walk(folder):
        if "estimates.json" in files and dirpath.endswith(os.path.join("new")):
            name = os.path.relpath(os.path.dirname(dirpath), folder)
            if name.startswith("report"):
                continue
            with open(os.path.join(dirpath, "estimates.json")) as f:
                est = json.load(f)
            rows.append((name, est["mean"]["point_estimate"]))
    return sorted(rows)


def human_ns(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def target(met):
    if met is None:
        return "not measured"
    return "**met**" if met else "**not met**"


def render(r, m, args):
    L = []
    L.append(f"Measured {m['date']} at commit `{m['commit']}` on {m['nproc']} cores "
             f"({m['cpu']}), {m['memory']} memory, Linux {m['kernel']}. "
             f"Load generators ran on the same machine. Each cell is min / **median** / max "
             f"over {args.runs_hint} repetitions; ratios use medians. Whole run (after compiling): {args.seconds // 60} min {args.seconds % 60} s.")
    L.append("")

    L.append("### 1. HTTP enqueue (`diag.noop`, 64 connections) and signed webhooks")
    L.append("")
    L.append("| who | jobs/s | p50 ms | p99 ms |")
    L.append("| --- | --- | --- | --- |")
    L.append(f"| Conveyor: 202 after record commit + broker confirm | {r.cell('http_enqueue','conveyor','rate')} | {r.cell('http_enqueue','conveyor','p50_ms',2)} | {r.cell('http_enqueue','conveyor','p99_ms',2)} |")
    L.append(f"| Dramatiq, confirms on (`send()`, one producer thread) | {r.cell('http_enqueue','dramatiq','rate')} | {r.cell('http_enqueue','dramatiq','p50_ms',2)} | {r.cell('http_enqueue','dramatiq','p99_ms',2)} |")
    L.append(f"| Dramatiq, confirms off (its default) | {r.cell('http_enqueue_noconfirm','dramatiq','rate')} | {r.cell('http_enqueue_noconfirm','dramatiq','p50_ms',2)} | {r.cell('http_enqueue_noconfirm','dramatiq','p99_ms',2)} |")
    L.append(f"| Ceiling: bare lapin, quorum, persistent, confirms pipelined (window 1000) | {r.cell('ceiling','ceiling','publish_rate')} | | |")
    L.append(f"| Bare lapin with 64 confirms outstanding (window 64: what 64 requests that each wait for a confirm could get) | {r.cell('ceiling','ceiling','publish_rate_window_64')} | | |")
    L.append(f"| Conveyor's group-commit recorder alone, 64 submissions in flight (no HTTP; record commit + broker confirm) | {r.cell('http_enqueue','recorder','rate')} | | |")
    batch = "http_enqueue_batch_100"
    L.append(f"| Conveyor, batched: `POST /v1/jobs/batch` of 100 jobs from 16 connections (202 after every record's commit + confirm; latency per request) | "
             f"{r.cell(batch,'conveyor','rate')} | {r.cell(batch,'conveyor','p50_ms',2)} | {r.cell(batch,'conveyor','p99_ms',2)} |")
    for scheme, name in (("v1a", "Ed25519"), ("v1", "HMAC-SHA256")):
        scenario = f"webhooks_{scheme}"
        L.append(f"| Conveyor: signed webhooks accepted/s (`{scheme}`, {name}; 202 after id claim + record commit + broker confirm) | "
                 f"{r.cell(scenario,'conveyor','rate')} | {r.cell(scenario,'conveyor','p50_ms',2)} | {r.cell(scenario,'conveyor','p99_ms',2)} |")
    conv = r.median("http_enqueue", "conveyor", "rate")
    d_on = r.median("http_enqueue", "dramatiq", "rate")
    d_off = r.median("http_enqueue_noconfirm", "dramatiq", "rate")
    ceil_pub = r.median("ceiling", "ceiling", "publish_rate")
    L.append("")
    L.append(f"Ratios: Conveyor / Dramatiq with confirms **{fmt_ratio(ratio(conv, d_on))}**, "
             f"/ Dramatiq without confirms **{fmt_ratio(ratio(conv, d_off))}**, "
             f"/ ceiling **{fmt_ratio(ratio(conv, ceil_pub))}**. "
             f"Every run checked that each 202's id has a record, that no other record exists, and that the work queue "
             f"holds exactly one message per 202: {'all consistent' if r.get('http_enqueue','conveyor','consistent') and all(r.get('http_enqueue','conveyor','consistent')) else 'NOT CONSISTENT or not measured'}; "
             f"refused (non-202) requests per run: {', '.join(f'{v:.0f}' for v in r.get('http_enqueue','conveyor','refused')) or 'n/a'}.")
    window_64 = r.median("ceiling", "ceiling", "publish_rate_window_64")
    recorder = r.median("http_enqueue", "recorder", "rate")
    if window_64 and recorder:
        L.append("")
        L.append(f"Where the enqueue's rate goes, at 64 in flight: the bare publisher makes "
                 f"{fmt_ratio(ratio(window_64, ceil_pub))} of its window-1000 rate; Conveyor's recorder (adding the "
                 f"record's commit) {fmt_ratio(ratio(recorder, window_64))} of that; the HTTP enqueue (adding the HTTP "
                 f"hop and its load generator on the same cores) {fmt_ratio(ratio(conv, recorder))} of the recorder alone.")
    batched = r.median(batch, "conveyor", "rate")
    if batched and conv:
        checked = r.get(batch, 'conveyor', 'consistent')
        L.append("")
        L.append(f"Batched (not a target scenario: the targets are for one job per request): "
                 f"{fmt_ratio(ratio(batched, conv))} the single-job enqueue, {fmt_ratio(ratio(batched, ceil_pub))} the ceiling, "
                 f"{fmt_ratio(ratio(batched, d_on))} Dramatiq with confirms; the same checks of records and queued messages: "
                 f"{'all consistent' if checked and all(checked) else 'NOT CONSISTENT'}.")
    hooks = r.get('webhooks_v1a', 'conveyor', 'consistent') + r.get('webhooks_v1', 'conveyor', 'consistent')
    L.append("")
    L.append(f"Signed webhooks (`bench-webhooks`: an `UPDATE` under a new `webhook-id` per request, 64 connections, no worker): every run checked "
             f"that each 202's job has a record and that remembered ids, `accepted` events, `webhook.profile_sync` records and queued messages "
             f"all number the 202s: {'all consistent' if hooks and all(hooks) else 'NOT CONSISTENT or not measured'}; "
             f"refused requests per run: {', '.join(f'{v:.0f}' for v in r.get('webhooks_v1a','conveyor','refused') + r.get('webhooks_v1','conveyor','refused')) or 'n/a'}.")
    L.append("")

    L.append("### 2. Drain (pre-enqueued jobs until all are recorded as done)")
    L.append("")
    L.append("| who | jobs/s (first start → last finish) | jobs/s (from process spawn) |")
    L.append("| --- | --- | --- |")
    L.append(f"| Conveyor, 1 worker process (`diag.noop`, state committed before the batched acks that cover it) | {r.cell('drain_1w','conveyor','rate')} | {r.cell('drain_1w','conveyor','rate_from_spawn')} |")
    L.append(f"| Conveyor, 2 worker processes | {r.cell('drain_2w','conveyor','rate')} | {r.cell('drain_2w','conveyor','rate_from_spawn')} |")
    L.append(f"| Dramatiq no-op actor ({os.cpu_count()} processes × 8 threads, its default) | {r.cell('drain_1w','dramatiq','rate')} | {r.cell('drain_1w','dramatiq','rate_from_spawn')} |")
    L.append(f"| Dramatiq actor writing one Postgres row | {r.cell('drain_1w_pg','dramatiq','rate')} | {r.cell('drain_1w_pg','dramatiq','rate_from_spawn')} |")
    L.append(f"| Ceiling: bare lapin consumer, prefetch 1000, manual acks off the loop | {r.cell('ceiling','ceiling','consume_rate')} | |")
    c1 = r.median("drain_1w", "conveyor", "rate")
    dn = r.median("drain_1w", "dramatiq", "rate")
    dp = r.median("drain_1w_pg", "dramatiq", "rate")
    ceil_con = r.median("ceiling", "ceiling", "consume_rate")
    L.append("")
    L.append(f"Ratios (1 Conveyor worker): / Dramatiq writing Postgres **{fmt_ratio(ratio(c1, dp))}**, "
             f"/ Dramatiq no-op **{fmt_ratio(ratio(c1, dn))}**, / ceiling **{fmt_ratio(ratio(c1, ceil_con))}**. "
             f"The preload (the ingress's recorder without HTTP) ran at {r.cell('preload','conveyor','rate')} jobs/s.")
    L.append("")

    L.append("### 3. End-to-end latency (1 000 jobs/s for the configured seconds, open loop)")
    L.append("")
    L.append("| who | achieved jobs/s | to start p50 ms | to start p99 ms | to finish p50 ms | to finish p99 ms |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for who, name in (("conveyor", "Conveyor: HTTP enqueue → worker start/finish (1 worker)"),
                      ("dramatiq", "Dramatiq: `send()` → actor start/finish (confirms off)")):
        L.append(f"| {name} | {r.cell('latency',who,'achieved_rate')} | {r.cell('latency',who,'start_p50_ms',2)} | "
                 f"{r.cell('latency',who,'start_p99_ms',2)} | {r.cell('latency',who,'finish_p50_ms',2)} | {r.cell('latency',who,'finish_p99_ms',2)} |")
    cp99 = r.median("latency", "conveyor", "start_p99_ms")
    dp99 = r.median("latency", "dramatiq", "start_p99_ms")
    L.append("")
    L.append(f"Ratio of start p99, Conveyor / Dramatiq: **{fmt_ratio(ratio(cp99, dp99))}**.")
    L.append("")

    L.append("### 4. Mail fan-out")
    L.append("")
    fan = r.get("fanout", "conveyor", "rate")
    if not fan:
        L.append("not measured in this run (`scenario_fanout` in `benches/run.sh`).")
    else:
        L.append("Recipients per second end to end (first claim to last `sent` in the ledger), to one local SMTP sink;")
        L.append("the ceiling is a bare lettre client (`TCP_NODELAY` sockets) on the same sink at the 4-worker SMTP concurrency.")
        L.append("")
        L.append("| workers | recipients/s (min / median / max) | share of the ceiling |")
        L.append("|---|---|---|")
        ceiling = r.median("fanout", "ceiling", "rate")
        for w in (1, 2, 4):
            med = r.median("fanout", "conveyor", f"rate_{w}w")
            L.append(f"| {w} | {r.cell('fanout', 'conveyor', f'rate_{w}w')} | {fmt_ratio(ratio(med, ceiling))} |")
        L.append(f"| bare lettre, `TCP_NODELAY` sockets (ceiling) | {r.cell('fanout', 'ceiling', 'rate')} | 1.00× |")
        stock = r.median("fanout", "lettre_transport", "rate")
        if stock is not None:
            L.append(f"| lettre's pooled transport (Nagle on, what Conveyor used before) | {r.cell('fanout', 'lettre_transport', 'rate')} | {fmt_ratio(ratio(stock, ceiling))} |")
    L.append("")

    L.append("### Memory")
    L.append("")
    peak = r.get("memory", "conveyor", "ingress_peak_rss")
    idle = r.median("memory", "conveyor", "worker_idle_rss")
    held = r.median("memory", "conveyor", "worker_delayed_rss")
    L.append("| what | MiB |")
    L.append("| --- | --- |")
    L.append(f"| ingress peak RSS (VmHWM) after all HTTP-enqueue runs | {max(peak):.1f} |" if peak else "| ingress peak RSS | not measured |")
    L.append(f"| worker RSS idle | {idle:.1f} |" if idle else "| worker RSS idle | not measured |")
    L.append(f"| worker RSS with 10 000 delayed jobs outstanding | {held:.1f} |" if held else "| worker RSS with delayed jobs | not measured |")
    L.append("")

    L.append("### Targets (issue 8)")
    L.append("")
    L.append("The ratios of medians decide; beside them, the ratio within each repetition (its systems ran in the")
    L.append("same minutes, so a slow or fast hour shifts both sides), min / median / max.")
    L.append("")
    L.append("| target | measured | per repetition | |")
    L.append("| --- | --- | --- | --- |")
    def row(name, value, met, spread=""):
        L.append(f"| {name} | {value} | {spread} | {target(met)} |")
    def ge(x, y):
        return None if x is None else x >= y
    def paired(scenario, metric, other):
        return fmt_spread(r.paired((scenario, "conveyor", metric), other))
    enq = ("http_enqueue", "rate")
    row("HTTP enqueue ≥ 10× Dramatiq with confirms", fmt_ratio(ratio(conv, d_on)), ge(ratio(conv, d_on), 10),
        paired(*enq, ("http_enqueue", "dramatiq", "rate")))
    row("HTTP enqueue ≥ 1× Dramatiq without confirms", fmt_ratio(ratio(conv, d_off)), ge(ratio(conv, d_off), 1),
        paired(*enq, ("http_enqueue_noconfirm", "dramatiq", "rate")))
    row("HTTP enqueue ≥ 50% of bare-broker publish", fmt_ratio(ratio(conv, ceil_pub)), ge(ratio(conv, ceil_pub), 0.5),
        paired(*enq, ("ceiling", "ceiling", "publish_rate")))
    row("Drain, 1 worker ≥ 5× Dramatiq writing Postgres", fmt_ratio(ratio(c1, dp)), ge(ratio(c1, dp), 5),
        paired("drain_1w", "rate", ("drain_1w_pg", "dramatiq", "rate")))
    row("Drain, 1 worker ≥ 2× Dramatiq no-op", fmt_ratio(ratio(c1, dn)), ge(ratio(c1, dn), 2),
        paired("drain_1w", "rate", ("drain_1w", "dramatiq", "rate")))
    row("Drain, 1 worker ≥ 50% of bare-broker consume", fmt_ratio(ratio(c1, ceil_con)), ge(ratio(c1, ceil_con), 0.5),
        paired("drain_1w", "rate", ("ceiling", "ceiling", "consume_rate")))
    row("p99 enqueue-to-start ≤ 5 ms at 1 000/s", "n/a" if cp99 is None else f"{cp99:.2f} ms", None if cp99 is None else cp99 <= 5,
        fmt_spread(r.get("latency", "conveyor", "start_p99_ms")) + " ms")
    row("p99 enqueue-to-start ≤ 2× Dramatiq's", fmt_ratio(ratio(cp99, dp99)), None if ratio(cp99, dp99) is None else ratio(cp99, dp99) <= 2,
        paired("latency", "start_p99_ms", ("latency", "dramatiq", "start_p99_ms")))
    row("Worker with 10 000 delayed jobs ≤ idle worker (+5% noise)",
        "n/a" if idle is None or held is None else f"{held:.1f} vs {idle:.1f} MiB",
        None if idle is None or held is None else held <= idle * 1.05)
    row("Ingress RSS under enqueue load < 100 MiB", f"{max(peak):.1f} MiB" if peak else "n/a", None if not peak else max(peak) < 100)
    L.append("")

    rows = criterion_rows(args.criterion)
    L.append("### Micro-benchmarks (Criterion, mean time per call)")
    L.append("")
    if rows:
        L.append("| benchmark | mean |")
        L.append("| --- | --- |")
        for name, ns in rows:
            L.append(f"| `{name}` | {human_ns(ns)} |")
    else:
        L.append("not measured in this run.")
    return "\n".join(L)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--results", required=True)
    p.add_argument("--criterion")
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    values, args.runs_hint = load(args.results)
    body = render(Results(values), machine(), args)
    block = f"{BEGIN}\n{body}\n{END}"
    if os.path.exists(args.out):
        text = open(args.out).read()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            text = head + block + tail
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Benchmark results\n\nWritten by `make bench` (benches/run.sh).\n\n## Latest run\n\n" + block + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
