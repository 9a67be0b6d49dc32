"""The validate report: one JSON file and one markdown summary, rewritten
after every stage so that a crash or a time-out later keeps what came before.

Stages hand back rows (dicts). A row with an "ok" key is a check; a row's
"table" names the markdown table it belongs to within its stage.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

FAILURES_SHOWN = 40  # per stage, in the markdown; the JSON has every row
ROWS_SHOWN = 60  # rows of a non-check table shown in the markdown


class Report:
    def __init__(self, out_dir: str, meta: dict):
        self.out_dir = out_dir
        self.json_path = os.path.join(out_dir, "report.json")
        self.md_path = os.path.join(out_dir, "summary.md")
        self.meta = dict(meta, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        self.stages: list[dict] = []
        os.makedirs(out_dir, exist_ok=True)
        self.write()

    def add(self, stage: dict) -> None:
        self.stages.append(stage)
        self.write()

    def failed_checks(self) -> list[dict]:
        return [r for s in self.stages for r in s["rows"] if r.get("ok") is False]

    def exit_code(self) -> int:
        """1: a check failed or a correctness stage broke off with an error;
        2: nothing failed, but a stage timed out or was left out for time;
        0: everything ran and passed."""
        if self.failed_checks() or any(s["status"] == "crashed" and s["correctness"] for s in self.stages):
            return 1
        if any(s["status"] != "ok" for s in self.stages):
            return 2
        return 0

    def write(self) -> None:
        doc = {"meta": self.meta, "stages": self.stages, "exit_code": self.exit_code() if self.stages else None}
        _atomic_write(self.json_path, json.dumps(doc, indent=1, default=str))
        _atomic_write(self.md_path, markdown(self.meta, self.stages))


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(meta: dict, stages: list[dict]) -> str:
    lines = [f"# resnet-fused-validate on {meta.get('device_name', meta.get('device'))}", ""]
    lines.append(" ".join(f"{k}: {v};" for k, v in meta.items() if k != "argv").rstrip(";"))
    lines += ["", "| stage | status | checks passed | failed | other rows | seconds |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in stages:
        checks = [r for r in s["rows"] if "ok" in r]
        failed = sum(r["ok"] is False for r in checks)
        lines.append(f"| {s['name']} | {s['status']} | {len(checks) - failed} | {failed} | "
                     f"{len(s['rows']) - len(checks)} | {s['seconds']:.1f} |")
    for s in stages:
        lines += ["", f"## {s['name']}: {s['status']} ({s['seconds']:.1f} s)"]
        if s.get("note"):
            lines += ["", s["note"]]
        lines += _stage_tables(s["rows"])
        if s["status"] not in ("ok", "skipped") and s.get("log_tail"):
            lines += ["", "```", *s["log_tail"].splitlines()[-15:], "```"]
    return "\n".join(lines) + "\n"


def _stage_tables(rows: list[dict]) -> list[str]:
    lines = []
    for table in dict.fromkeys(r.get("table", "results") for r in rows):
        group = [r for r in rows if r.get("table", "results") == table]
        checks = [r for r in group if "ok" in r]
        lines += ["", f"### {table}"]
        if checks and len(checks) == len(group):
            lines += _check_summary(checks)
        else:
            lines += _table(group[:ROWS_SHOWN])
            if len(group) > ROWS_SHOWN:
                lines.append(f"\n({len(group) - ROWS_SHOWN} more rows in report.json)")
    return lines


def _check_summary(checks: list[dict]) -> list[str]:
    failed = [r for r in checks if r["ok"] is False]
    worst = max(checks, key=lambda r: _ratio(r))
    lines = [f"{len(checks) - len(failed)}/{len(checks)} passed; worst error/tolerance "
             f"{_ratio(worst):.3g} ({worst['name']})"]
    if failed:
        lines += ["", "failures:"] + _table(failed[:FAILURES_SHOWN])
        if len(failed) > FAILURES_SHOWN:
            lines.append(f"\n({len(failed) - FAILURES_SHOWN} more failures in report.json)")
    return lines


def _ratio(row: dict) -> float:
    err, tol = row.get("err"), row.get("tol")
    if row.get("ok") is False and not isinstance(err, (int, float)):
        return float("inf")
    if isinstance(err, (int, float)) and isinstance(tol, (int, float)) and tol > 0:
        return err / tol
    return 0.0


def _table(rows: list[dict]) -> list[str]:
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "table"]
    out = ["", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return out


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "/").replace("\n", " ")[:120]


def read_rows(paths: list[str]) -> list[dict]:
    """Rows a stage's processes wrote, one JSON object a line; a line cut
    short by a kill is dropped."""
    rows = []
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def tail(path: str, chars: int = 4000) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-chars:]
