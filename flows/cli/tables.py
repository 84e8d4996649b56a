"""The tables the commands print: one function per table, from the JSON the command also prints."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from flows.cli.app import fmt


def harvest_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table("track", "read", "kept", "dropped", "redacted", "sha256", title=title)
    for row in rows:
        dropped = ", ".join(f"{k} {v}" for k, v in row["dropped"].items()) or "-"
        redacted = ", ".join(f"{k} {v}" for k, v in row["redactions"].items()) or "-"
        table.add_row(row["track"], str(row["read"]), str(row["rows"]), dropped, redacted, row["sha256"][:12])
    return table


def judge_table(tracks: list[dict[str, Any]], title: str) -> Table:
    table = Table("track", "judged", "failed", "skipped", "reward", "ρ rating", "thumb acc", "calls", "hits",
                  title=title)  # fmt: skip
    for track in tracks:
        judged, calibration = track["judge"], track["judge"]["calibration"]
        table.add_row(
            track["track"],
            str(judged["scored"]),
            str(judged["failed"]),
            str(judged["skipped"]),
            fmt(judged["mean_reward"]),
            fmt(calibration.get("spearman_rating")),
            fmt(calibration.get("thumb_accuracy")),
            fmt(judged["judge"]["judge_calls"]),
            fmt(judged["judge"]["judge_cache_hits"]),
        )
    return table


def night_table(entries: list[dict[str, Any]], title: str) -> Table:
    table = Table(
        "track",
        "status",
        "version",
        "rows",
        "reward",
        "judge ρ",
        "method",
        "steps",
        "stop",
        "KL",
        "deployed",
        "note",
        title=title,
    )
    for entry in entries:
        trained = entry.get("train") or {}
        table.add_row(
            entry["track"],
            entry["status"],
            fmt(entry.get("version")),
            fmt(entry.get("rows")),
            fmt(entry.get("mean_reward")),
            fmt((entry.get("calibration") or {}).get("spearman_rating")),
            fmt(trained.get("method")),
            fmt(trained.get("steps")),
            fmt(trained.get("stop_reason")),
            fmt(trained.get("kl")),
            "yes" if entry.get("deployed") else "no",
            entry.get("error") or ("already done" if entry.get("already_done") else ""),
        )
    return table


def gate_table(report: dict[str, Any], title: str) -> Table:
    table = Table("gate", "passed", "metric", "Δ vs champion", "CI", "threshold", "n", "reason", title=title)
    for gate in report["gates"]:
        low, high = gate.get("ci_low"), gate.get("ci_high")
        interval = "-" if gate.get("delta") is None else f"[{fmt(low)}, {fmt(high)}]"
        table.add_row(
            gate["name"],
            "[green]yes[/green]" if gate["passed"] else "[red]no[/red]",
            fmt(gate.get("metric")),
            fmt(gate.get("delta")),
            interval,
            fmt(gate.get("threshold")),
            fmt(gate.get("n")),
            "" if gate["passed"] else gate.get("reason", ""),
        )
    return table


def trend_table(nights: list[dict[str, Any]]) -> Table:
    """Held-out reward of champion and candidate per night and track: the loop's learning curve."""
    table = Table(
        "night",
        "track",
        "champion",
        "candidate",
        "gain CI",
        "status",
        "why",
        title="held-out reward by night (math: exact-answer accuracy on unseen problems)",
    )
    for night in nights:
        for entry in night["tracks"]:
            gate = entry.get("gate") or {}
            gates = {g["name"]: g for g in (gate.get("gates") or [])}
            gain = gates.get("heldout_gain")
            why = gate.get("reason") or entry.get("reason") or ""
            if gain is None:
                table.add_row(str(night["night"]), entry["track"], "-", "-", "-", entry["status"], why)
                continue
            interval = f"[{fmt(gain['ci_low'])}, {fmt(gain['ci_high'])}]"
            table.add_row(
                str(night["night"]),
                entry["track"],
                fmt(gain.get("champion_metric")),
                fmt(gain.get("metric")),
                interval,
                entry["status"],
                why if entry["status"] != "promoted" else "",
            )
    return table


def users_table(nights: list[dict[str, Any]], after: dict[str, Any] | None = None) -> Table:
    """The simulated users' thumbs-up rate on the served support track: before each night's update
    (so night 1 is the base), then `after` the last night."""
    table = Table(
        "day", "asked", "answered by", "thumbs up", "why not", title="support: simulated users, by day"
    )
    days = [(f"before night {night['night']}", night.get("users")) for night in nights]
    if nights:
        days.append((f"after night {nights[-1]['night']}", after))
    for label, users in days:
        if not users:
            continue
        rate = users.get("thumbs_up_rate")
        why = ", ".join(
            f"{reason} {count}" for reason, count in sorted(users["why"].items()) if reason != "good"
        )
        table.add_row(
            label,
            str(users["asked"]),
            ", ".join(sorted(users["served_by"])) or "-",
            "-" if rate is None else f"{rate:.0%}",
            why,
        )
    return table


def host(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def version_name(value: Any) -> str:
    return f"v{value}" if isinstance(value, int) else ("-" if value is None else str(value))
