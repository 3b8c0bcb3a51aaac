"""The request and answer models of ``POST /v1/classify`` and the one-line message a 422
gives for a request they refuse.

Requests are strict: unknown fields are refused (with the closest name), texts must be
valid UTF-8, ``top_k`` is a JSON integer >= 1 or null (``"3"``, ``true`` and ``2.0`` are
refused, not coerced) and ``return_probs`` a JSON boolean. ``validation_message`` turns
pydantic's errors into ``inputs.0.text: Field required``-style text, one line::

    try:
        ClassifyRequest.model_validate(body)
    except ValidationError as exc:
        message = validation_message(exc.errors())  # "top_k: Input should be a valid integer"
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from peftkit.data.dataset import not_utf8
from peftkit.errors import did_you_mean

__all__ = [
    "FIELDS",
    "ClassifyRequest",
    "ClassifyResponse",
    "InputRow",
    "RowResult",
    "Text",
    "validation_message",
]


def _utf8(text: str) -> str:
    """Lone surrogates (``"\\ud800"`` in JSON) refused here: 422 naming the field."""
    problem = not_utf8(text)
    if problem is not None:
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class InputRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text
    text_pair: Text | None = None
    adapter: Text | None = Field(
        None, description="name, name@N or name@alias; default: the request's"
    )


class ClassifyRequest(BaseModel):
    # strict per field, not per model: a strict model would refuse a row given as a mapping
    model_config = ConfigDict(extra="forbid")
    adapter: Text | None = Field(None, description="the adapter of rows that name none")
    inputs: list[Text | InputRow]
    # "3", true and 2.0 are a 422, not 3, 1 and 2
    top_k: StrictInt | None = Field(None, ge=1, description="probabilities kept per row (all)")
    return_probs: StrictBool = True  # "yes" is a 422, not True


class RowResult(BaseModel):
    label: str
    score: float
    probs: dict[str, float] | None = None
    ref: str = Field(description="the version that answered, name@N")
    adapter: str = Field(description="the adapter as asked for")
    abstained: bool = Field(
        False, description="the adapter's reject option declined (label, score: its best)"
    )


class ClassifyResponse(BaseModel):
    results: list[RowResult]


FIELDS = {"adapter", "inputs", "top_k", "return_probs", "text", "text_pair"}


def validation_message(errors: Any) -> str:
    """pydantic's errors as one line naming each field (``inputs.0.text: Field required``);
    the alternatives of ``str | InputRow`` are folded into one message per row."""
    parts: list[str] = []
    errors = list(errors)
    # a row one alternative of ``Text | InputRow`` refused by its value (a lone surrogate)
    # is answered with that reason, not with the other alternative's type error
    refused = set()
    for e in errors:
        at = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "value_error" and len(at) >= 3 and at[0] == "inputs":
            refused.add(at[1])
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if len(loc) >= 3 and loc[0] == "inputs" and loc[2].startswith("function-after"):
            loc[2] = "str"  # the Text alternative, named by its validator
        row_refused = loc[:1] == ["inputs"] and len(loc) >= 3 and loc[1] in refused
        if row_refused and error.get("type") != "value_error":
            continue
        if error.get("type") == "value_error":
            where = ".".join(loc[:2] + loc[3:] if loc[:1] == ["inputs"] else loc)
            parts.append(f"{where}: {str(error.get('msg', '')).removeprefix('Value error, ')}")
            continue
        if error.get("type") == "json_invalid":
            parts.append(
                f"the body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
            )
            continue
        if len(loc) >= 3 and loc[0] == "inputs" and loc[2] in ("str", "InputRow"):
            if loc[2] == "str" or len(loc) == 3:
                parts.append(
                    f"inputs.{loc[1]}: must be a string or a mapping with 'text' (and 'text_pair', 'adapter')"
                )
                continue
            loc = [*loc[:2], *loc[3:]]
        where = ".".join(loc) or "body"
        if error.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field{did_you_mean(loc[-1], FIELDS)}")
        else:
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique[:4]) + (f"; and {len(unique) - 4} more" if len(unique) > 4 else "")
