"""Use cases of the consent room: set and read a household's consent."""

from __future__ import annotations

from services.common import audit
from services.common.errors import InvalidArgument
from services.common.ids import check_id
from services.common.identity import current_principal
from services.privacy.consent.store import Consent, ConsentStore


MAX_WITHDRAWN_PAGE = 10_000
MAX_CONSENTS = 1000   # GetConsents' accounts a call


class ConsentApp:
    def __init__(self, store: ConsentStore) -> None:
        self.store = store

    def set_consent(self, account_id: str, processing: bool, attribution: bool) -> int:
        """Store the flags. The RPC's audit record (``consent_change``) carries the new
        flags, the previous ones (``previous``: ``null`` when the account had none set,
        i.e. both allowed) and the version: until session 20 it said only that consent
        changed, so the log could not show when an account withdrew or gave it back."""
        check_id(account_id, "account_id")
        before, version = self.store.change_consent(account_id, processing, attribution, current_principal().id)
        audit.add_rpc_details(
            processing=bool(processing), attribution=bool(attribution), version=version,
            previous={"processing": before.processing, "attribution": before.attribution} if before.known else None)
        return version

    def consent(self, account_id: str) -> Consent:
        check_id(account_id, "account_id")
        return self.store.consent(account_id)

    def consents(self, account_ids: list[str]) -> list[Consent]:
        """``consent`` of each distinct account, in order (GetConsents)."""
        if not 0 < len(account_ids) <= MAX_CONSENTS:
            raise InvalidArgument(f"must hold 1..{MAX_CONSENTS} account ids, got {len(account_ids)}", "account_ids")
        accounts = list(dict.fromkeys(check_id(a, f"account_ids[{i}]") for i, a in enumerate(account_ids)))
        return self.store.consents(accounts)

    def withdrawn(self, after_account_id: str, limit: int) -> tuple[list[Consent], bool]:
        """A page of the accounts whose processing or attribution consent is withdrawn."""
        if after_account_id:
            check_id(after_account_id, "after_account_id")
        if not 0 <= limit <= MAX_WITHDRAWN_PAGE:
            raise InvalidArgument(f"must be 0 (= {MAX_WITHDRAWN_PAGE}) to {MAX_WITHDRAWN_PAGE}", "limit")
        return self.store.withdrawn(after_account_id, limit or MAX_WITHDRAWN_PAGE)
