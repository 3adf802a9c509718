"""Reading Tencent's callback bodies: one JSON object or an array of them.

Both of Tencent's callbacks (replies and delivery reports) share this shape,
and a developer debugging an integration needs the same precise answers from
both: which byte is not UTF-8, where the JSON breaks, which item is not an object.
"""

from __future__ import annotations

import json
from typing import Any


class BadBody(Exception):  # noqa: N818 - named for what the caller sent
    """A callback body we refuse, with the reason for Tencent's (or a developer's) logs."""


def json_objects(
    body: bytes, *, max_items: int, noun: str, error: type[BadBody] = BadBody
) -> tuple[list[dict[str, Any]], bool]:
    """The objects in ``body`` and whether it was an array; ``error`` (a BadBody) says what is wrong."""
    try:
        data: Any = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"body is not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise error(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    is_array = isinstance(data, list)
    items = data if is_array else [data]
    if not items:
        raise error(f"empty array: no {noun} in the callback")
    if len(items) > max_items:
        raise error(f"too many {noun} in one callback ({len(items)}, at most {max_items})")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            where = f"[{index}]" if is_array else "body"
            raise error(f"{where}: expected a JSON object, got {type(item).__name__}")
    return items, is_array
