"""Validated configs: the stages' and the build's settings as pydantic dataclasses.

A config class is a frozen dataclass (so `dataclasses.fields`, `replace` and `asdict` work as
on any dataclass) whose field types and constraints pydantic checks when it is built, in strict
mode: an integer field takes no bool and no "3", a `Literal` field only its choices, a tuple
field a tuple. What one field's type cannot say (one field's rule depending on another's value)
stays in `__post_init__`, which runs after the fields are checked. A bad value raises
`ConfigError`, a ValueError whose message names the class and the field in plain words::

    ScoreConfig: batch_size must be greater than or equal to 1, got 0

Prefect renders pydantic dataclasses as forms; the same validation runs for a flow parameter,
a run-config file and a CLI option.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

T = TypeVar("T")

STRICT = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

# Constrained field types shared by the configs.
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonEmptyStr = Annotated[str, Field(min_length=1, pattern=r"\S")]


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the class and the field."""


def describe_errors(class_name: str, error: ValidationError) -> str:
    """pydantic's errors as one line per field: '<Class>: <field> must be ..., got <value>'."""
    lines = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        if item["type"] == "value_error":  # raised by __post_init__: its own message
            lines.append(f"{class_name}: {item['ctx']['error']}")
            continue
        if item["type"] == "unexpected_keyword_argument":
            lines.append(f"{class_name}: unknown setting {field!r}")
            continue
        # pydantic says "Input should be ...", "String should have ...": "must be", "must have"
        message = re.sub(r"^\w+ should ", "must ", item["msg"])
        lines.append(f"{class_name}: {field} {message}, got {item['input']!r}")
    return "\n".join(lines)


def config_class(cls: type[T]) -> type[T]:
    """Make `cls` a frozen, strictly validated pydantic dataclass raising ConfigError."""
    validated = pydantic_dataclass(frozen=True, config=STRICT)(cls)
    checked_init = validated.__init__

    @functools.wraps(checked_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            checked_init(self, *args, **kwargs)
        except ValidationError as error:
            raise ConfigError(describe_errors(cls.__name__, error)) from None

    validated.__init__ = __init__
    return validated
