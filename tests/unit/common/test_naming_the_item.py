"""`naming_the_item` renames a batch's household error to the household's first item
(b258ea7); review29: it rebuilt the error as type(exc)(message, field), which fails for an
error type with another constructor and drops attributes of its own."""

import pytest

from services.common.errors import FailedPrecondition, Unavailable, about_account, naming_the_item


class RetryLater(Unavailable):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, "account_id")
        self.retry_after_s = retry_after_s


def test_a_household_error_names_its_first_item_and_keeps_its_type():
    with pytest.raises(FailedPrecondition) as refused:
        with naming_the_item(["a", "b", "b"], "events"):
            raise about_account(FailedPrecondition("the household was erased", "account_id"), "b")
    assert refused.value.field == "events[1].account_id" and refused.value.message == "the household was erased"


def test_an_error_type_with_its_own_constructor_and_attributes_keeps_them():
    with pytest.raises(RetryLater) as refused:
        with naming_the_item(["a"], "touchpoints"):
            raise about_account(RetryLater("privacy is busy", retry_after_s=3.0), "a")
    assert refused.value.field == "touchpoints[0].account_id" and refused.value.retry_after_s == 3.0


def test_an_error_about_no_household_of_the_batch_is_left_as_it_is():
    with pytest.raises(FailedPrecondition) as refused:
        with naming_the_item(["a"], "events"):
            raise about_account(FailedPrecondition("erased", "account_id"), "zz")
    assert refused.value.field == "account_id"
