"""Strict input fields and serializers: the wrong JSON type is refused,
not coerced; limits are read from the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Model
from django.utils.encoding import force_str
from rest_framework import exceptions, serializers
from rest_framework.fields import SkipField, empty, get_error_detail
from rest_framework.serializers import as_serializer_error
from rest_framework.settings import api_settings
from rest_framework.utils.field_mapping import get_field_kwargs

# DRF coerces "12", 12.0 and true to integers and 12 to a string; a JSON API
# should refuse the wrong JSON type instead of guessing.


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if type(data) is not int:
            self.fail("invalid")
        return data


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data: Any) -> float:
        if type(data) not in (int, float):
            self.fail("invalid")
        try:
            return float(data)
        except OverflowError:  # a JSON integer beyond float's range (10**400)
            self.fail("invalid")


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictUUIDField(serializers.UUIDField):
    """A UUID only as JSON text (DRF would also take the integer 42)."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if type(data) is not bool:
            self.fail("invalid")
        return data


def model_field(
    model: type[Model],
    name: str,
    field_class: type[serializers.Field],
    *,
    extra_validators: tuple[Callable[[Any], None], ...] = (),
    **kwargs: Any,
) -> serializers.Field:
    """A DRF field carrying the model field's limits, validators and default.

    The limits are defined once, on the model (``LIMITS``, ``max_length``,
    validators, and the database's integer range); this only reads them.
    """
    db_field = model._meta.get_field(name)
    options = get_field_kwargs(name, db_field)
    options.pop("model_field", None)
    if db_field.has_default() and not callable(db_field.default):
        options["default"] = db_field.default
    options["validators"] = [*options.get("validators", ()), *extra_validators]
    options.update(kwargs)
    if options.get("required"):
        options.pop("default", None)
    return field_class(**options)


class StrictSerializer(serializers.Serializer):
    """An input shape: its fields document the request body in the schema and
    validate it; a field it does not declare is an error too.

    ``validated()`` runs it as ``is_valid`` would, hooks included.
    """

    def to_internal_value(self, data: Any) -> Any:
        unknown = unknown_fields(data, self.fields) if isinstance(data, Mapping) else {}
        try:
            values = super().to_internal_value(data)
        except exceptions.ValidationError as exc:
            if unknown and isinstance(exc.detail, dict):
                raise exceptions.ValidationError({**exc.detail, **unknown}) from None
            raise
        if unknown:
            raise exceptions.ValidationError(unknown)
        return values


_shared_fields: dict[type[serializers.Serializer], dict[str, serializers.Field]] = {}


def validated(
    serializer_class: type[StrictSerializer], data: Any, *, partial: bool = False
) -> dict[str, Any]:
    """``data`` validated by ``serializer_class``; else ValidationError (400).

    What ``serializer_class(data=data, partial=partial).is_valid()`` does —
    field validation, ``validate_<field>`` hooks, ``validate()``, the
    unknown-field check — with the fields built once per class:
    a Serializer instance deep-copies every declared field when it first
    reads ``fields``, which costs ten times the validation itself (≈ 170 µs
    of a create request, docs/PERFORMANCE.md, "Write path"). The fields keep
    no per-request state, so sharing them is safe; the hooks run on a
    serializer of this request (``initial_data``, ``partial`` set). A class
    with serializer-level ``Meta.validators`` goes through ``is_valid``.
    tests/test_http_fields.py holds both paths to the same answers.
    With ``partial`` (PATCH) absent fields are skipped, not defaulted.
    """
    if not isinstance(data, Mapping):
        # What DRF says for a list or a string; for ``null`` it would say "No
        # data provided", which is wrong for a body that was sent.
        message = serializers.Serializer.default_error_messages["invalid"]
        raise exceptions.ValidationError(
            {
                api_settings.NON_FIELD_ERRORS_KEY: [
                    message.format(datatype=type(data).__name__)
                ]
            },
            code="invalid",
        )
    serializer = serializer_class(data=data, partial=partial)  # builds no fields
    if getattr(getattr(serializer_class, "Meta", None), "validators", None):
        serializer.is_valid(raise_exception=True)
        return dict(serializer.validated_data)
    fields = _shared_fields.get(serializer_class)
    if fields is None:
        fields = _shared_fields[serializer_class] = dict(serializer_class().fields)
    values: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for name, field in fields.items():
        primitive = data.get(name, empty)
        if field.read_only or (partial and primitive is empty):
            continue
        hook = getattr(serializer, f"validate_{name}", None)
        try:
            value = field.run_validation(primitive)
            values[name] = value if hook is None else hook(value)
        except exceptions.ValidationError as exc:
            errors[name] = exc.detail
        except DjangoValidationError as exc:
            errors[name] = get_error_detail(exc)
        except SkipField:
            pass
    errors |= unknown_fields(data, fields)
    if errors:
        raise exceptions.ValidationError(errors)
    try:
        return dict(serializer.validate(values))
    except (exceptions.ValidationError, DjangoValidationError) as exc:
        raise exceptions.ValidationError(as_serializer_error(exc)) from None


def unknown_fields(data: Mapping, fields: Mapping[str, Any]) -> dict[str, list[str]]:
    return {force_str(key): ["Unknown field."] for key in data if key not in fields}
