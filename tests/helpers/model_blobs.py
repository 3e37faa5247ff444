"""A stored household model as an older format stored it: the same bytes without a key of the
JSON header (a field added since), to test that from_bytes keeps its old meaning."""

from __future__ import annotations

import io
import json

import numpy as np


def without_meta_key(blob: bytes, key: str) -> bytes:
    """``blob`` (HouseholdModel.to_bytes) with ``key`` taken out of its header."""
    z = dict(np.load(io.BytesIO(blob), allow_pickle=False))
    meta = json.loads(bytes(z["meta"]).decode())
    del meta[key]
    z["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **z)
    return buf.getvalue()
