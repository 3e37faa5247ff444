"""Use cases of the privacy service."""

from __future__ import annotations

from services.common.ids import check_id
from services.common.identity import current_principal
from services.privacy.store import Consent, PrivacyStore


class PrivacyApp:
    def __init__(self, store: PrivacyStore) -> None:
        self.store = store

    def set_consent(self, account_id: str, processing: bool, attribution: bool) -> int:
        check_id(account_id, "account_id")
        return self.store.set_consent(account_id, processing, attribution, current_principal().id)

    def consent(self, account_id: str) -> Consent:
        check_id(account_id, "account_id")
        return self.store.consent(account_id)
