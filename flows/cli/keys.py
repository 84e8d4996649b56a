"""`overnight keys create | list | revoke`: the gateway's API keys.

A key is shown in clear once, by `create`; the store keeps only its sha256 (`storage.keys`). Each key
names the tracks it may call and its traffic's defaults: consent when a request does not say
(`X-Overnight-Consent`), and whether traffic without consent is stored at all.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli.app import JsonFlag, _Group, app, load, print_json, stderr, stdout, wants_json
from storage.errors import UserError

keys_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="API keys for the gateway: create (shown once), list, revoke."
)
app.add_typer(keys_app, name="keys")


def parse_tracks(text: str, known: list[str]) -> list[str]:
    """`a,b` -> ["a", "b"]; `*` -> ["*"] (every track, later ones too); unknown names are an error."""
    tracks = [name.strip() for name in text.split(",") if name.strip()]
    if not tracks:
        raise UserError("--tracks: give at least one track, or '*' for all")
    if "*" in tracks:
        return ["*"]
    unknown = [name for name in tracks if name not in known]
    if unknown:
        raise UserError(
            f"--tracks: unknown track {unknown[0]!r} (configured: {', '.join(known) or 'none'}; '*' for all)"
        )
    return list(dict.fromkeys(tracks))


def key_json(row: Any) -> dict[str, Any]:
    return {
        "name": row.name,
        "tracks": list(row.tracks),
        "consent_default": row.consent_default,
        "store_traffic": row.store_traffic,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


@keys_app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who holds the key; logged with its traffic.")],
    tracks: Annotated[
        str, typer.Option("--tracks", help="Tracks it may call, comma-separated ('*': all).")
    ] = "*",
    no_consent_default: Annotated[
        bool,
        typer.Option("--no-consent-default", help="Its traffic has no consent unless a request says it has."),
    ] = False,
    no_store: Annotated[
        bool, typer.Option("--no-store", help="Do not store its traffic without consent at all.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Create a key; the key is printed once (only its sha256 is stored)."""
    import storage
    from storage.keys import create_api_key, find_api_key

    cfg = load(ctx)
    allowed = parse_tracks(tracks, [track.name for track in cfg.tracks])
    engine = storage.connect(cfg.database.url)
    key = create_api_key(
        engine, name, allowed, consent_default=not no_consent_default, store_traffic=not no_store
    )
    row = find_api_key(engine, key)
    payload = {**key_json(row), "key": key}
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    stdout.print(key, markup=False, highlight=False, soft_wrap=True)
    stderr.print(
        f"key {name!r} for tracks {', '.join(allowed)}: shown once, keep it now "
        "(send it as `Authorization: Bearer <key>`)"
    )


@keys_app.command("list")
def list_keys(
    ctx: typer.Context,
    revoked: Annotated[bool, typer.Option("--revoked", help="Also list revoked keys.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """The keys by name, with their tracks and defaults (never the keys themselves)."""
    import storage
    from storage.keys import list_api_keys

    cfg = load(ctx)
    rows = list_api_keys(storage.connect(cfg.database.url), include_revoked=revoked)
    payload = {"keys": [key_json(row) for row in rows]}
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    table = Table(
        "name", "tracks", "consent default", "stores traffic without consent", "created", title="keys"
    )
    if revoked:
        table.add_column("revoked")
    for entry in payload["keys"]:
        cells = [
            entry["name"],
            ", ".join(entry["tracks"]),
            "yes" if entry["consent_default"] else "no",
            "yes" if entry["store_traffic"] else "no",
            (entry["created_at"] or "-")[:19],
        ]
        if revoked:
            cells.append((entry["revoked_at"] or "-")[:19])
        table.add_row(*cells)
    stdout.print(table)


@keys_app.command("revoke")
def revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The key's name.")],
    json_output: JsonFlag = False,
) -> None:
    """Revoke a key: gateways refuse it within `gateway.key_cache_seconds`."""
    import storage
    from storage.keys import revoke_api_key

    cfg = load(ctx)
    if not revoke_api_key(storage.connect(cfg.database.url), name):
        raise UserError(f"no live api key named {name!r} (see `overnight keys list`)")
    if wants_json(ctx, json_output):
        print_json({"name": name, "revoked": True})
        return
    stdout.print(f"key {name!r} revoked")
