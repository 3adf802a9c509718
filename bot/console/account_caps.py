"""Lifting an account-wide cap by hand, from the banner every console page shows while one is in force.

When Tencent reports an account-wide daily cap (``LimitExceeded.AppDailyLimit``
and kin), the delivery loop holds every reply the cap covers until the next
China day, without asking Tencent again. Raising the limit in Tencent's
console does not tell smsbot: without this button replies would go on
expiring until midnight. Lifting ends the cap now; the delivery loop sends
again, and if Tencent still refuses, the cap is recorded again by the first
refused send. Replies that already expired stay expired (never sent late).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import RedirectResponse, Response

from bot.console.display import fmt_time
from bot.console.queries.account_caps import lift_cap
from bot.console.users import audit
from bot.console.web import PREFIX, AdminUser, ConsoleRouter, engine, now, render, runtime
from bot.store.db import WRITE_OPTIONS

router = ConsoleRouter(prefix=PREFIX)


@router.post("/account-caps/lift", include_in_schema=False)
def lift(
    request: Request,
    admin: AdminUser,
    code: Annotated[str, Form()] = "",
    nationcode: Annotated[str, Form()] = "",
) -> Response:
    at = now(request)
    with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        until = lift_cap(conn, code=code, nationcode=nationcode, at=at)
        if until is not None:
            audit(
                conn,
                actor=admin.name,
                action="account_cap.lift",
                target=f"account_cap:{code}:{nationcode}",
                detail={"code": code, "nationcode": nationcode, "until": fmt_time(until) + " China time"},
                now=at,
            )
    if until is None:
        message = f"no account-wide cap {code!r}{f' for +{nationcode}' if nationcode else ''} is in force"
        return render(request, "error.html", {"status": 409, "message": message}, status_code=409)
    runtime(request).pipeline.wake_delivery()  # the held replies go now, wherever the delivery loop runs
    return RedirectResponse(f"{PREFIX}/deliveries?done=cap-lifted", status_code=303)
