"""``validated()``: DRF's own validation, plus refusing undeclared fields."""

from __future__ import annotations

import pytest
from rest_framework import exceptions, serializers

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
