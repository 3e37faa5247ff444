"""bench.label_names_probe: label names bound to persons a stream keeps (docs/clustering.md)."""

from __future__ import annotations

from bench import label_names_probe as P
from bench import worlds


def test_every_name_is_counted_once_and_a_bound_name_keeps_its_person():
    hs = [h for h in worlds.generate(worlds.TUNING, families=("mobile_first",), worlds_per_family=1,
                                     households_per_world=3) if h.n_persons >= 2][:1]
    out = P.probe(hs, share=0.3)
    names = {f"name{p}" for p in hs[0].person}
    assert out["households"] == 1 and out["label_names"] == len(names)
    assert out["bound_but_lost"] == 0     # the guard: no refit loses a person a label names
    assert 0 <= out["never_bound"] <= out["label_names"] and 0.0 < out["final_model_accuracy"] <= 1.0
