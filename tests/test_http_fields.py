"""``validated()``: what DRF's ``is_valid`` answers (hooks included), plus
refusing undeclared fields, with the fields built once per class."""

from __future__ import annotations

import pytest
from rest_framework import exceptions, serializers

from generations.api import GenerationCreateSerializer, GenerationUpdateSerializer
from lockngen.http.fields import StrictCharField, StrictSerializer, validated


class Booking(StrictSerializer):
    name = StrictCharField()
    room = StrictCharField(required=False)

    def validate_name(self, value: str) -> str:
        if value == "nobody":
            raise serializers.ValidationError("Not a name.")
        return value.title()

    def validate(self, attrs: dict) -> dict:
        if attrs.get("room") == attrs.get("name"):
            raise serializers.ValidationError("A room is not named after its guest.")
        return attrs


def errors(data: object, **kwargs: object) -> dict:
    with pytest.raises(exceptions.ValidationError) as caught:
        validated(Booking, data, **kwargs)
    return caught.value.detail


def test_field_hooks_run_and_may_change_the_value():
    assert validated(Booking, {"name": "ada"}) == {"name": "Ada"}
    assert errors({"name": "nobody"}) == {"name": ["Not a name."]}


def test_the_object_hook_runs():
    assert errors({"name": "Ada", "room": "Ada"}) == {
        "non_field_errors": ["A room is not named after its guest."]
    }


def test_unknown_fields_are_reported_with_the_field_errors():
    assert errors({"name": 7, "colour": "red"}) == {
        "name": ["Not a valid string."],
        "colour": ["Unknown field."],
    }
    assert errors({"name": "ada", "colour": "red"}) == {"colour": ["Unknown field."]}


@pytest.mark.parametrize(
    ("body", "datatype"), [(None, "NoneType"), ([], "list"), ("x", "str")], ids=str
)
def test_a_body_that_is_not_an_object_is_refused(body, datatype):
    assert errors(body) == {
        "non_field_errors": [
            f"Invalid data. Expected a dictionary, but got {datatype}."
        ]
    }


def test_partial_skips_absent_fields_instead_of_requiring_them():
    assert validated(Booking, {"room": "12"}, partial=True) == {"room": "12"}
    assert errors({"room": "12"}) == {"name": ["This field is required."]}


class Pair(StrictSerializer):
    first = StrictCharField()
    second = StrictCharField()

    class Meta:
        validators = [lambda attrs: None]

    def validate(self, attrs: dict) -> dict:
        if attrs["first"] == attrs["second"]:
            raise serializers.ValidationError({"second": ["Must differ."]})
        return attrs


def by_is_valid(serializer_class: type, data: dict, partial: bool) -> object:
    serializer = serializer_class(data=data, partial=partial)
    if serializer.is_valid():
        return dict(serializer.validated_data)
    return serializer.errors


def by_validated(serializer_class: type, data: dict, partial: bool) -> object:
    try:
        return validated(serializer_class, data, partial=partial)
    except exceptions.ValidationError as exc:
        return exc.detail


@pytest.mark.parametrize(
    ("serializer_class", "data", "partial"),
    [
        (Booking, {"name": "ada", "room": "7"}, False),
        (Booking, {"name": "nobody", "room": 7, "x": 1}, False),
        (Booking, {"name": "Ada", "room": "Ada"}, False),
        (Booking, {}, True),
        (Pair, {"first": "a", "second": "a"}, False),
        (Pair, {"first": "a", "second": "b"}, False),
        (GenerationCreateSerializer, {"prompt": "a fox"}, False),
        (GenerationCreateSerializer, {"prompt": "a fox", "guidance": 7.555}, False),
        (
            GenerationCreateSerializer,
            {"prompt": "", "width": 65, "steps": "20", "seed": -1, "colour": 1},
            False,
        ),
        (GenerationUpdateSerializer, {"name": "fox"}, True),
        (GenerationUpdateSerializer, {"prompt_id": 3, "status": "x"}, True),
    ],
    ids=[
        "valid",
        "hook-type-unknown",
        "object-hook",
        "partial-empty",
        "meta-validators-object-hook",
        "meta-validators-valid",
        "create-defaults",
        "create-decimals",
        "create-many-errors",
        "update-partial",
        "update-errors",
    ],
)
def test_validated_answers_as_is_valid(serializer_class, data, partial):
    assert by_validated(serializer_class, data, partial) == by_is_valid(
        serializer_class, data, partial
    )
