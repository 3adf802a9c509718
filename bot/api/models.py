"""The API's bodies and answers, as pydantic models: they are the OpenAPI document's schemas too."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.rules.normalize import unstorable

MAX_BATCH = 1000


class StartBody(BaseModel):
    """Start (or restart) a conversation: send ``template`` and put the number in ``state`` with ``vars``."""

    model_config = ConfigDict(extra="forbid")

    signature: str = Field(min_length=1, max_length=128, description="the SMS signature, as in the rule file")
    nationcode: str = Field(pattern=r"^\+?\d{1,4}$", description="country code: 86 for mainland China")
    mobile: str = Field(pattern=r"^\d{5,20}$", description="the number without country code")
    template: str = Field(min_length=1, max_length=128, description="a template NAME from that signature's rule file")
    params: list[str] | None = Field(
        default=None,
        max_length=20,
        description="one per placeholder of the template: plain text, or a Jinja2 expression over vars "
        "(`{{ vars.first_name }}`), rendered in the rules' sandbox",
    )
    state: str | None = Field(
        default=None, max_length=128, description="the state to enter (default: the file's start)"
    )
    vars: dict[str, str] | None = Field(
        default=None, description="text values merged into the conversation's vars before params are rendered"
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the same key from the same API key within 24 h answers the first answer again, sending nothing",
    )

    @field_validator("signature", "nationcode", "mobile", "template", "params", "state", "vars", "idempotency_key")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        """No NUL or half a character anywhere: such text can be neither stored nor sent (422 naming the field)."""
        texts = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for text in texts:
            problem = unstorable(text) if isinstance(text, str) else None
            if problem is not None:
                raise ValueError(problem)
        return value


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(
        max_length=MAX_BATCH,
        description=f"up to {MAX_BATCH} start bodies; each is checked and answered on its own",
        json_schema_extra={"items": {"$ref": "#/components/schemas/StartBody"}},
    )


class Started(BaseModel):
    conversation_id: int
    message_id: int
    state: str
    message_status: Literal["queued", "looping"] = Field(
        description="queued: in the outbox; looping: held by the loop guard (stored, not sent)"
    )
    text: str = Field(description="what the customer will read (without the signature)")
    segments: int
    params: list[str] = Field(description="the params as rendered")
    extend_code: str | None


class ApiError(BaseModel):
    """Every refusal: ``error`` says which kind; ``field`` names the request's field at fault (422)."""

    error: Literal["invalid", "opted_out", "unauthorized", "forbidden", "not_found"]
    field: str | None = Field(default=None, description="e.g. params, params[1], vars.order_id, items")
    detail: str


class BatchResult(BaseModel):
    index: int = Field(description="the item's position in `items`, from 0")
    status: Literal[202, 409, 422]
    conversation_id: int | None = None
    message_id: int | None = None
    state: str | None = None
    message_status: str | None = None
    text: str | None = None
    segments: int | None = None
    params: list[str] | None = None
    extend_code: str | None = None
    error: str | None = None
    field: str | None = None
    detail: str | None = None


class BatchAnswer(BaseModel):
    results: list[BatchResult]


class MessageView(BaseModel):
    id: int
    direction: Literal["in", "out"]
    text: str
    status: str
    created_at: datetime
    state_before: str | None
    state_after: str | None
    template: str | None
    params: list[str] | None
    rule: str | None
    rule_kind: str | None
    started_by: str | None
    sent_at: datetime | None
    delivered_at: datetime | None


class ConversationView(BaseModel):
    conversation_id: int
    signature: str
    nationcode: str
    mobile: str
    state: str | None
    expires_at: datetime | None
    vars: dict[str, Any]
    opted_out: bool
    opted_out_at: datetime | None
    created_at: datetime
    updated_at: datetime
    messages: list[MessageView] = Field(description="the newest 20 messages, oldest first")


class VarsAnswer(BaseModel):
    conversation_id: int
    created: bool = Field(description="the conversation did not exist before")
    state: str | None
    opted_out: bool
    vars: dict[str, Any] = Field(description="all of the conversation's vars after the merge")
