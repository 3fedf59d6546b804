"""Settings declared once: each CARDCHECK_* variable is one field of a pydantic-settings model,
with its default, its meaning (the field's description) and its checks in one place. The
variable is the model's env_prefix and the field's name in capitals, or the field's alias where
the name says something else (a duration field read in seconds, say). `cardcheck config` and
docs/configuration.md list them from these declarations.

A model built directly (`GatewayConfig(field=...)`) takes its arguments and defaults only;
`from_env(env)` reads the environment as well. Either way a bad value is a SettingsError with a
one-line message naming the variable, which stops a service at start (exit 2)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, core_schema
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PREFIX = "CARDCHECK_"
M = TypeVar("M")


class SettingsError(ValueError):
    """A configuration value is missing or malformed: the process refuses to start."""


def refuse(problem: str) -> PydanticCustomError:
    """A validator's refusal. `problem` either names its variable itself (it starts with
    PREFIX) or says what is wrong with the value (`is not a number`), and the message becomes
    `<VARIABLE>=<value> <problem>`."""
    return PydanticCustomError("setting", "{problem}", {"problem": problem})


def problem_of(error: PydanticCustomError) -> str:
    """What `refuse` said was wrong."""
    return str((error.context or {})["problem"])


@dataclass(frozen=True)
class Number:
    """A finite number within bounds: from the environment as text, from code as a number. With
    `unit`, the field is a timedelta and the variable counts in that unit (seconds, hours...)."""

    integer: bool = False
    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None
    unit: timedelta | None = None

    def check(self, value: Any) -> Any:
        if value is None or self.unit is not None and isinstance(value, timedelta):
            return value  # an optional setting unset, or a duration given as one
        if isinstance(value, str):
            try:
                value = int(value) if self.integer else float(value)
            except ValueError:
                raise refuse(f"is not {'a whole number' if self.integer else 'a number'}") from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise refuse("is not a number")
        if not math.isfinite(value):
            raise refuse("is not a finite number")
        if self.integer and value != int(value):
            raise refuse("is not a whole number")
        bounds = []
        if self.above is not None and not value > self.above:
            bounds.append(f"above {self.above:g}")
        if self.at_least is not None and not value >= self.at_least:
            bounds.append(f"at least {self.at_least:g}")
        if self.at_most is not None and not value <= self.at_most:
            bounds.append(f"at most {self.at_most:g}")
        if bounds:
            raise refuse(f"must be {'a whole number ' if self.integer else ''}{' and '.join(bounds)}")
        if self.unit is not None:
            return self.unit * value
        return int(value) if self.integer else float(value)

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(self.check, handler(source))


@dataclass(frozen=True)
class Family:
    """A field read from several variables, one per key, into a dict: `template` with `{}` for
    the key in capitals. `keys` lists them; without it any key is read (e.g. a bank's code), and
    the validator says which it knows."""

    template: str
    keys: tuple[str, ...] | None = None
    key_text: str = "KEY"  # how the listing names the key of an open family
    # For a field made of parts (a policy of several numbers): each key's default and meaning.
    defaults: tuple[tuple[str, Any], ...] = ()
    meanings: tuple[tuple[str, str], ...] = ()

    def variable(self, key: str) -> str:
        return self.template.format(key.upper())

    def checked(self, values: Mapping[str, Any], numbers: Mapping[str, Number]) -> dict[str, Any]:
        """Each part of `values` (its default when absent) through its Number; a refusal names
        the part's variable."""
        defaults = dict(self.defaults)
        out = {}
        for key, number in numbers.items():
            value = values.get(key, defaults[key])
            try:
                out[key] = number.check(value)
            except PydanticCustomError as error:
                raise refuse(f"{self.variable(key)}={value!r} {problem_of(error)}") from None
        return out

    def each(self, values: Mapping[str, Any], check: Callable[[str, Any], Any]) -> dict[str, Any]:
        """`check(key, value)` over the family's values; a refusal names the entry's variable."""
        out = {}
        for key, value in values.items():
            try:
                out[key] = check(key, value)
            except PydanticCustomError as error:
                raise refuse(f"{self.variable(key)}={value!r} {problem_of(error)}") from None
        return out

    def read(self, env: Mapping[str, str]) -> dict[str, str]:
        if self.keys is not None:
            return {key: env[self.variable(key)] for key in self.keys if env.get(self.variable(key))}
        head, _, tail = self.template.partition("{}")
        return {
            var[len(head):len(var) - len(tail)]: value
            for var, value in env.items()
            if var.startswith(head) and var.endswith(tail) and len(var) > len(head) + len(tail) and value
        }


@dataclass(frozen=True)
class Secret:
    """Marks a field whose value is never shown (listings redact it; reprs hide it)."""


@dataclass(frozen=True)
class Internal:
    """Marks a field code and tests set, read from no variable."""


def marker(field: FieldInfo, kind: type[M]) -> M | None:
    return next((m for m in field.metadata if isinstance(m, kind)), None)


_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("cardcheck_settings_env", default=None)


class _MappingSource(PydanticBaseSettingsSource):
    """The declared variables of one model, from one mapping (not necessarily os.environ); an
    empty value counts as unset."""

    settings_cls: type[DeclaredSettings]

    def __init__(self, settings_cls: type[DeclaredSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the mapping itself

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            key = field.validation_alias if isinstance(field.validation_alias, str) else name
            family = marker(field, Family)
            if marker(field, Internal) is not None:
                continue
            if family is not None:
                found = family.read(self.env)
                if found:
                    values[key] = found
            elif self.env.get(var := self.settings_cls.variable(name)):
                values[key] = self.env[var]
        return values


class DeclaredSettings(BaseSettings):
    """The base of every service's settings model: immutable, built from arguments or from an
    environment mapping, refusing bad values with a SettingsError."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, validate_by_name=True, validate_by_alias=True,
        arbitrary_types_allowed=True, extra="forbid",
    )
    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(self._message(error)) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        token = _ENV.set(os.environ if env is None else env)
        try:
            return cls()
        finally:
            _ENV.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _ENV.get()
        return (init_settings,) if env is None else (init_settings, _MappingSource(cls, env))

    @classmethod
    def variable(cls, name: str) -> str:
        """The variable field `name` is read from (a family's template)."""
        field = cls.model_fields[name]
        family = marker(field, Family)
        if family is not None:
            return family.template
        if isinstance(field.validation_alias, str):
            return field.validation_alias
        return f"{cls.model_config.get('env_prefix', '')}{name.upper()}"

    @classmethod
    def _message(cls, error: ValidationError) -> str:
        first = error.errors()[0]
        problem = first["ctx"]["problem"] if first["type"] == "setting" else first["msg"]
        if problem.startswith(PREFIX) or not first["loc"]:
            return problem
        key = str(first["loc"][0])
        name = next((n for n, f in cls.model_fields.items() if key in (n, f.validation_alias)), key)
        shown = "***" if name in cls.model_fields and marker(cls.model_fields[name], Secret) is not None else repr(first["input"])
        return f"{cls.variable(name) if name in cls.model_fields else key}={shown} {problem}"

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, checked as a new one would be."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})
