"""Use cases of the consent room: set and read a household's consent."""

from __future__ import annotations

from services.common.ids import check_id
from services.common.identity import current_principal
from services.privacy.consent.store import Consent, ConsentStore


class ConsentApp:
    def __init__(self, store: ConsentStore) -> None:
        self.store = store

    def set_consent(self, account_id: str, processing: bool, attribution: bool) -> int:
        check_id(account_id, "account_id")
        return self.store.set_consent(account_id, processing, attribution, current_principal().id)

    def consent(self, account_id: str) -> Consent:
        check_id(account_id, "account_id")
        return self.store.consent(account_id)
