"""Figures of a benchmark run gathered into one JSON file and a markdown table beside it
(bench/gpu.sh: every script of the run adds to the same file).

    report = Report(path)            # path: the JSON; None: nothing is written
    report.add("offline fp16, RAG mix", 11682.0, "inputs/s")
    report.add("HTTP / offline, short queries", 0.93, "x", target=">= 0.9")
    report.write()                   # merges into the JSON, rewrites the .md

A figure with a target gets a verdict (met / missed) in both files.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


class Report:
    def __init__(self, path: Path | None, section: str = "") -> None:
        self.path = path
        self.section = section
        self.figures: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def fact(self, name: str, value: Any) -> None:
        """Something about the run (device, model, versions): a line above the table."""
        self.facts[name] = value

    def add(self, name: str, value: float, unit: str = "", target: str | None = None) -> None:
        figure: dict[str, Any] = {"section": self.section, "name": name, "value": value}
        figure["unit"] = unit
        if target is not None:
            op, bound = target.split()
            figure["target"] = target
            figure["met"] = bool(_OPS[op](value, float(bound)))
        self.figures.append(figure)

    def write(self) -> None:
        if self.path is None:
            return
        data: dict[str, Any] = {"facts": {}, "figures": []}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
        data["facts"].update(self.facts)
        names = {(f["section"], f["name"]) for f in self.figures}
        kept = [f for f in data["figures"] if (f["section"], f["name"]) not in names]
        data["figures"] = kept + self.figures
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1) + "\n")
        self.path.with_suffix(".md").write_text(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    lines = [f"- {k}: {v}" for k, v in data["facts"].items()]
    lines += ["", "| section | figure | value | target |", "|---|---|---|---|"]
    for f in data["figures"]:
        value = f["value"]
        if "cosine" in f["name"]:
            shown = f"{value:.5f}"
        elif abs(value) < 100:
            shown = f"{value:.3g}"
        else:
            shown = f"{value:,.0f}"
        verdict = ""
        if "target" in f:
            verdict = f"{f['target']}: {'met' if f['met'] else '**missed**'}"
        lines.append(f"| {f['section']} | {f['name']} | {shown} {f['unit']} | {verdict} |")
    return "\n".join(lines) + "\n"
