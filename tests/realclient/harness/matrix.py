"""Writes the comparison table (markdown) from the JSON lines conftest.py records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCENARIOS = {
    "test_a_host_edits_alone_then_colleague_joins": "a. host edits alone, then a colleague joins",
    "test_b_colleague_connects_first": "b. colleague connects first",
    "test_c_concurrent_edits_then_late_joiner": "c. concurrent edits, late joiner",
    "test_d_host_reconnects_with_300_items": "d. host reconnects (300 items)",
    "test_e_server_restart_then_both_reconnect": "e. server restart, both reconnect",
    "test_f_disconnect_is_clean": "f. Disconnect",
    "test_g_a_yjs_client_moves_and_turns_an_item": "g. a Yjs client moves and turns an item",
}
BACKENDS = {
    "server": "optiverse-collab",
    "server-snap": "optiverse-collab, magnetic snap ON",
    "relay-upstream": "upstream's relay",
    "relay-fork": "fork's relay",
}


def main(results: Path, out: Path) -> None:
    rows: dict[tuple, dict] = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        key = (r["backend"], r["scenario"], r["pair"])
        # A failed setup or teardown counts; a passed call does not hide a failed teardown.
        if key not in rows or r["outcome"] != "passed":
            rows[key] = r
    pairs = sorted({k[2] for k in rows}, key=lambda p: ["upstream/upstream", "fork/fork",
                                                         "upstream/fork", "fork/upstream"].index(p))
    lines = ["# Real clients: scenario matrix", "",
             "Host/joiner variants per column; each cell: pass, or FAIL with the first failed "
             "assertion (numbered below).", ""]
    notes = []
    for backend in [b for b in BACKENDS if any(k[0] == b for k in rows)]:
        lines += [f"## {BACKENDS[backend]} (`{backend}`)", "",
                  "| scenario | " + " | ".join(pairs) + " |",
                  "| --- |" + " --- |" * len(pairs)]
        for scenario, title in SCENARIOS.items():
            cells = []
            for pair in pairs:
                r = rows.get((backend, scenario, pair))
                if r is None:
                    cells.append("not run")
                elif r["outcome"] == "passed":
                    cells.append(f"pass ({r['seconds']} s)")
                elif r["outcome"] == "skipped":
                    cells.append("n/a")
                else:
                    notes.append(r["message"].replace("|", "\\|"))
                    cells.append(f"FAIL [{len(notes)}]")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["## First failed assertions", ""]
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
