"""Tables for bench/compare.sh.

`compare_table.py RESULTS.jsonl` prints the Markdown comparison (this server's `memory` and
`sqlite` stores against the `reference` y-websocket server, with the targets of issue 6);
`compare_table.py --brief` reads one collab-load JSON report on stdin and prints one line.
"""

import json
import sys


def brief(report):
    s = report.get("scenario")
    if s == "fanout":
        lat = report["latency_ms"]
        cpu = report.get("server_cpu_us_per_delivery")
        cpu = f"{cpu:.2f} us/delivery" if cpu is not None else "cpu n/a"
        return (f"{report['delivered_per_s']:.0f} deliveries/s, {cpu}, p50 {lat['p50']:.2f} ms, "
                f"p99 {lat['p99']:.2f} ms, lost {report['lost']}, failures {report['client_failures']}")
    if s == "join":
        lat = report["time_to_synced_ms"]
        return (f"{report.get('server_cpu_ms_per_join', float('nan')):.1f} ms server CPU/join, "
                f"synced p50 {lat['p50']:.0f} ms, {report['sync_bytes_per_join']} bytes")
    if s == "idle":
        return (f"{report.get('server_rss_kib_per_connection', float('nan')):.2f} KiB/connection, "
                f"{report['synced']} synced, failures {report['client_failures']}")
    return json.dumps(report)


def load(path):
    runs = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                runs[(r["server"], r["label"])] = r["report"]
    return runs


def saturation(runs, server):
    """Highest delivered rate among the steps that kept p99 <= 100 ms with no loss."""
    best = None
    for (srv, label), r in runs.items():
        if srv != server or not label.startswith("saturation@"):
            continue
        ok = r["lost"] == 0 and r["client_failures"] == 0 and r["latency_ms"]["p99"] <= 100
        if ok and (best is None or r["delivered_per_s"] > best):
            best = r["delivered_per_s"]
    return best


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def table(runs):
    servers = ["reference", "memory", "sqlite"]
    rows = []

    def get(server, label, *keys):
        r = runs.get((server, label))
        for k in keys:
            if r is None:
                return None
            r = r.get(k)
        return r

    def row(metric, values, target, met, digits=2):
        ref, mem, sql = values
        rows.append([metric] + [fmt(v, digits) for v in values]
                    + [ratio(mem, ref), ratio(sql, mem), target, met])

    sat = [saturation(runs, s) for s in servers]
    row("saturation, 1x50 (deliveries/s, p99 <= 100 ms, no loss; no-apply receivers)", sat,
        "sqlite >= 80 % of memory", verdict(sat[2] is not None and sat[1] and sat[2] >= 0.8 * sat[1]), 0)
    for label, bar in [("fanout 1x50x2", "ref"), ("fanout 1x200x1", 4.0), ("fanout 100x5x2", 4.0)]:
        cpu = [get(s, label, "server_cpu_us_per_delivery") for s in servers]
        if bar == "ref":
            target = "<= 1/5 of reference"
            ok = cpu[0] is not None and cpu[1] is not None and cpu[1] <= cpu[0] / 5
        else:
            target = f"< {bar:g} us (Hocuspocus: 4-5 us)"
            ok = cpu[1] is not None and cpu[1] < bar
        row(f"{label}: server CPU us per delivery", cpu, target, verdict(ok))
        row(f"{label}: sqlite CPU within 1.25x of memory", cpu, "sqlite >= 80 % of memory",
            verdict(cpu[1] is not None and cpu[2] is not None and cpu[2] <= cpu[1] / 0.8))
        for pct in ["p50", "p99"]:
            lat = [get(s, label, "latency_ms", pct) for s in servers]
            if pct == "p99":
                ok = None not in lat and lat[1] <= lat[0] and lat[2] <= lat[0]
                row(f"{label}: latency {pct} (ms)", lat, "<= reference", verdict(ok))
            else:
                row(f"{label}: latency {pct} (ms)", lat, "", "")
        lost = [get(s, label, "lost") for s in servers]
        row(f"{label}: lost deliveries", lost, "0", verdict(lost[1] == 0 and lost[2] == 0), 0)
    join = [get(s, "join 10000", "server_cpu_ms_per_join") for s in servers]
    row("join of a 10,000-item scene: server CPU ms per join", join, "<= 1/10 of reference",
        verdict(None not in join and join[1] <= join[0] / 10 and join[2] <= join[0] / 10), 1)
    synced = [get(s, "join 10000", "time_to_synced_ms", "p50") for s in servers]
    row("join of a 10,000-item scene: time to synced p50 (ms)", synced, "", "", 0)
    rss = [get(s, "idle 1000x5", "server_rss_kib_per_connection") for s in servers]
    row("5,000 idle connections in 1,000 rooms: RSS KiB per connection", rss, "<= 4 KiB",
        verdict(None not in rss and rss[1] <= 4 and rss[2] <= 4))

    head = ["metric", "reference", "memory", "sqlite", "memory/ref", "sqlite/memory", "target", "met"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def verdict(ok):
    return "yes" if ok else "**no**"


def main():
    if sys.argv[1:] == ["--brief"]:
        print(brief(json.loads(sys.stdin.read())))
    elif len(sys.argv) == 2:
        table(load(sys.argv[1]))
    else:
        sys.exit("usage: compare_table.py RESULTS.jsonl | --brief < REPORT.json")


if __name__ == "__main__":
    main()
