"""What the API tests share: a rule file with a start flow, API keys, and calls with a key."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine

from bot.api.keys import add_key, revoke_key
from tests.support import Harness, write_rules, writing

RULES = """\
signature: Acme Shop
templates:
  remind:    {id: "2000001", text: "Appointment {1} at {2}. Reply 1 to confirm."}
  confirmed: {id: "2000002", text: "Confirmed: {1}."}
  hello:     {id: "2000003", text: "Hello from Acme."}
  promo:     {id: "2000004", text: "Sale today. Reply TD to opt out.", marketing: true}
  bye:       {id: "2000005", text: "Bye."}
  menu:      {id: "2000006", text: "Menu."}
opt_out: {keywords: [TD], reply: bye}
start: idle
states:
  idle:
    on:
      - keywords: [HI]
        reply: menu
  reminder:
    entry: true
    expires: 1d
    on:
      - keywords: ["1"]
        reply: confirmed
        params: ["{{ vars.appointment_id }}"]
        goto: idle
"""

SIGN = "Acme Shop"


def api_rules(folder: Path, *, extend: str | None = None) -> Path:
    """The start flow's rule file; ``extend`` scopes it to that extend code (file-level ``extend:``)."""
    text = (
        RULES
        if extend is None
        else RULES.replace("signature: Acme Shop\n", f'signature: Acme Shop\nextend: "{extend}"\n')
    )
    write_rules(folder, "acme.yaml", text)
    return folder


def new_key(engine: Engine, name: str = "crm", scopes: tuple[str, ...] = ("start", "read", "vars")) -> str:
    with writing(engine) as conn:
        return add_key(conn, name, list(scopes), now=datetime.now(UTC))


def revoke(engine: Engine, name: str) -> None:
    with writing(engine) as conn:
        revoke_key(conn, name, now=datetime.now(UTC))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_body(mobile: str = "13800000001", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "signature": SIGN,
        "nationcode": "86",
        "mobile": mobile,
        "template": "remind",
        "params": ["{{ vars.appointment_id }}", "10:00"],
        "state": "reminder",
        "vars": {"appointment_id": "A17"},
    }
    body.update(fields)
    return body


def start(h: Harness, key: str, body: dict[str, Any]) -> httpx.Response:
    return h.client.post("/api/v1/conversations", json=body, headers=auth(key))
