"""Paraphrase pairs: the same clinical yes/no question asked two ways (about the same image or case).

`ParaphrasePair` is what later stages consume; a `ParaphraseGroup` (PSF-Med has 5-6 phrasings per question)
expands into pairs. `builtin("register")` is the bundled set; `load_pairs()` reads PSF-Med-style JSONL/CSV;
`clusters()` and `split()` keep pairs that share a question, an image or a case together (statistics, splits).
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from interp._errors import InterpError
from interp._io import _path
from interp.models import Prompt

RESOURCES = Path(__file__).parent / "resources"

_YES = {"yes", "y", "true", "t", "1", "1.0", "positive", "present"}
_NO = {"no", "n", "false", "f", "0", "0.0", "negative", "absent"}


def normalize_answer(value: Any) -> str | None:
    """``"yes"``, ``"no"`` or None from yes/no/true/false/1/0 (any case), a bool, or an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip().strip(".!").strip().lower()
    if text in ("", "none", "null", "nan", "n/a", "na", "unknown", "?"):
        return None
    if text in _YES:
        return "yes"
    if text in _NO:
        return "no"
    raise InterpError(f"answer {value!r} is not a yes/no answer; use yes/no, true/false or 1/0 (or leave it empty)")


def _flip(answer: str | None) -> str | None:
    return None if answer is None else ("no" if answer == "yes" else "yes")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        hint = (" (several phrasings of one question go in a ParaphraseGroup, or a 'questions' list column)"
                if isinstance(value, (list, tuple)) else "")
        raise InterpError(f"{what} must be a string, got {type(value).__name__} {str(value)[:60]!r}{hint}")


@dataclass(frozen=True)
class ParaphrasePair:
    """Two phrasings of one yes/no question. ``answer`` is the gold answer to ``question_a``."""

    id: str
    question_a: str
    question_b: str
    answer: str | None = None  # "yes" / "no" for question_a, or None when there is no gold answer
    image: str | None = None  # path of the image both phrasings are asked about
    same_polarity: bool = True  # False: question_b inverts the answer ("rule out effusion?")
    kind: str = ""  # register, lexical, syntactic, negation, ...
    context: str | None = None  # text shown before the question (a report), for text-only models
    group: str | None = None  # id of the question when it has more than two phrasings
    case: str | None = None  # study / patient / image id: pairs about one case are not independent units

    def __post_init__(self) -> None:
        _check_text(self.question_a, f"pair {self.id!r}: question_a")
        _check_text(self.question_b, f"pair {self.id!r}: question_b")
        if not str(self.question_a).strip() or not str(self.question_b).strip():
            raise InterpError(f"pair {self.id!r}: both question_a and question_b must be non-empty")
        if self.answer is not None and self.answer not in ("yes", "no"):
            raise InterpError(f"pair {self.id!r}: answer={self.answer!r}; use 'yes', 'no' or None")

    @property
    def answer_b(self) -> str | None:
        """The gold answer to ``question_b`` (flipped when the rewrite inverts polarity)."""
        return self.answer if self.same_polarity else _flip(self.answer)

    def prompt_a(self) -> Prompt:
        """Model input for phrasing A (question, image, context)."""
        return Prompt(self.question_a, self.image, self.context)

    def prompt_b(self) -> Prompt:
        """Model input for phrasing B (question, image, context)."""
        return Prompt(self.question_b, self.image, self.context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ParaphraseGroup:
    """Several phrasings of one yes/no question; ``questions[0]`` is the reference phrasing."""

    id: str
    questions: tuple[str, ...]
    polarities: tuple[bool, ...] = ()  # per phrasing: same polarity as questions[0]? (empty: all True)
    answer: str | None = None  # gold answer to questions[0]
    image: str | None = None
    kind: str = ""  # default kind of every rewrite
    context: str | None = None
    kinds: tuple[str, ...] = ()  # per-phrasing kind (overrides ``kind``; entry 0 is unused)
    case: str | None = None  # study / patient / image id (see ParaphrasePair.case)

    def __post_init__(self) -> None:
        if isinstance(self.questions, str):
            raise InterpError(f"group {self.id!r}: questions is one string; pass a tuple of phrasings")
        for k, q in enumerate(self.questions):
            _check_text(q, f"group {self.id!r}: phrasing {k}")
        questions = tuple(self.questions)
        object.__setattr__(self, "questions", questions)
        if len(questions) < 2:
            raise InterpError(f"group {self.id!r} has {len(questions)} phrasing(s); a group needs at least two")
        if any(not q.strip() for q in questions):
            raise InterpError(f"group {self.id!r}: every phrasing must be non-empty")
        polarities = tuple(bool(p) for p in self.polarities) or (True,) * len(questions)
        object.__setattr__(self, "polarities", polarities)
        if len(polarities) != len(questions):
            raise InterpError(f"group {self.id!r}: {len(polarities)} polarities for {len(questions)} phrasings; "
                              "give one polarity per phrasing (or none)")
        if not polarities[0]:
            raise InterpError(f"group {self.id!r}: the reference phrasing (the first) cannot invert its own "
                              "polarity; polarities are relative to it, so polarities[0] must be True")
        kinds = tuple(str(k) for k in self.kinds)
        object.__setattr__(self, "kinds", kinds)
        if kinds and len(kinds) != len(questions):
            raise InterpError(f"group {self.id!r}: {len(kinds)} kinds for {len(questions)} phrasings")
        if self.answer is not None and self.answer not in ("yes", "no"):
            raise InterpError(f"group {self.id!r}: answer={self.answer!r}; use 'yes', 'no' or None")

    def __len__(self) -> int:
        return len(self.questions)

    def pairs(self) -> list[ParaphrasePair]:
        """One pair per rewrite: the reference phrasing (a) against phrasing k (b), ids ``"{id}#{k}"``."""
        return [ParaphrasePair(id=f"{self.id}#{k}", question_a=self.questions[0], question_b=self.questions[k],
                               answer=self.answer, image=self.image, same_polarity=self.polarities[k],
                               kind=(self.kinds[k] if self.kinds and self.kinds[k] else self.kind),
                               context=self.context, group=self.id, case=self.case)
                for k in range(1, len(self.questions))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def groups_of(pairs: Iterable[ParaphrasePair]) -> list[ParaphraseGroup]:
    """Regroup pairs by ``group`` (pairs without one become two-phrasing groups), in first-seen order."""
    order: dict[str, list[ParaphrasePair]] = {}
    for p in pairs:
        order.setdefault(p.group if p.group is not None else p.id, []).append(p)
    out = []
    for gid, members in order.items():
        ref = members[0]
        for p in members[1:]:
            if (p.question_a, p.image, p.context, p.answer, p.case) != (ref.question_a, ref.image, ref.context,
                                                                         ref.answer, ref.case):
                raise InterpError(f"pairs {ref.id!r} and {p.id!r} share group {gid!r} but differ in question_a, "
                                  "image, context, answer or case; a group has one reference phrasing, image and answer")
        out.append(ParaphraseGroup(id=gid, questions=(ref.question_a, *[p.question_b for p in members]),
                                   polarities=(True, *[p.same_polarity for p in members]), answer=ref.answer,
                                   image=ref.image, context=ref.context,
                                   kinds=("", *[p.kind for p in members]), case=ref.case))
    return out


def builtin(name: str = "register") -> list[ParaphrasePair]:
    """Bundled pairs. ``"register"``: chest X-ray questions, formal clinical (a) vs lay (b) register."""
    if name != "register":
        raise InterpError(f"unknown built-in pair set {name!r}; available: 'register'")
    pairs = []
    for line in (RESOURCES / "register_pairs.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        pairs.append(ParaphrasePair(id=row["id"], question_a=row["question_a"], question_b=row["question_b"],
                                    answer=row["answer"], same_polarity=row["same_polarity"], kind=row["kind"],
                                    context=row["context"] or None))
    return pairs


# ---- loading PSF-Med-style exports ----------------------------------------------------------------
# Our field -> column names accepted for it (compared after lower-casing and turning spaces/dashes into _).
ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "pair_id", "question_id", "qid", "uid", "sample_id"),
    # PSF-Med exports name the question (the group of its rewrites) question_id beside a per-row pair_id
    "group": ("group", "group_id", "question_group", "cluster_id", "question_id", "qid"),
    "case": ("case", "case_id", "study_id", "study", "subject_id", "patient_id", "image_id", "dicom_id"),
    "question_a": ("question_a", "original", "original_question", "q1", "question1", "reference_question",
                   "source_question", "question"),
    "question_b": ("question_b", "paraphrase", "paraphrased_question", "q2", "question2", "rephrased_question",
                   "rewritten_question", "variant"),
    "question": ("question", "phrasing", "text", "prompt", "paraphrase", "paraphrased_question"),
    "questions": ("questions", "phrasings", "paraphrases", "variants"),
    "answer": ("answer", "label", "gold", "gold_answer", "ground_truth", "answer_a", "gt"),
    "answer_b": ("answer_b", "label_b", "gold_b"),
    "image": ("image", "image_path", "dicom_path", "img", "image_file", "img_path", "file_path", "path"),
    "same_polarity": ("same_polarity", "polarity_preserved", "preserves_polarity", "same_answer"),
    "inverted": ("inverted", "polarity_inverted", "inverts_polarity", "flipped_polarity", "negated"),
    "polarity": ("polarity",),
    "polarities": ("polarities", "same_polarities"),
    "kind": ("kind", "paraphrase_type", "category", "type", "rewrite_type"),
    "kinds": ("kinds", "paraphrase_types", "categories", "types"),
    "context": ("context", "report", "report_text", "findings"),
    "is_reference": ("is_original", "is_reference", "reference", "role"),
}
FIELDS = tuple(ALIASES)


def _norm_col(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _read_rows(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row dict) for each record of a JSONL, JSON-array, CSV or TSV file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding=encoding) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InterpError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON "
                                      "object") from None
                if not isinstance(row, dict):
                    raise InterpError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding=encoding))
        except json.JSONDecodeError as e:
            raise InterpError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise InterpError(f"{path}: expected a JSON array of objects (or use JSONL, one object per line)")
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise InterpError(f"{path}: record {i} is a {type(row).__name__}, expected an object")
            yield i, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding,
                       newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                return
            width = len(header)
            start = reader.line_num + 1
            for cells in reader:
                lineno, start = start, reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != width:
                    raise InterpError(f"{path}:{lineno}: {len(cells)} cells but the header has {width} columns; "
                                      "check quoting of commas and newlines in this row")
                yield lineno, dict(zip(header, cells, strict=True))
    else:
        raise InterpError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def _read_all_rows(path: Path, encoding: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        return list(_read_rows(path, encoding))
    except UnicodeDecodeError as e:
        data = path.read_bytes()
        try:  # the exception's offset is relative to a read chunk; find the first bad byte in the whole file
            data.decode(encoding)
            at = e.start
        except UnicodeDecodeError as whole:
            at = whole.start
        line = data[:at].count(b"\n") + 1
        raise InterpError(f"{path}:{line}: byte 0x{data[at]:02x} at offset {at} is not valid {encoding}; the file "
                          f"is in another encoding (Excel often writes cp1252 or latin-1). Re-save it as UTF-8 "
                          f"(e.g. iconv -f cp1252 -t utf-8 '{path}' > fixed{path.suffix}) or pass "
                          "load_pairs(..., encoding='cp1252')") from None
    except LookupError:
        raise InterpError(f"encoding={encoding!r} is not a known text encoding; use e.g. 'utf-8', 'cp1252' or "
                          "'latin-1'") from None


def _is_empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _as_bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    text = str(v).strip().lower()
    if text in ("true", "t", "yes", "y", "1", "1.0"):
        return True
    if text in ("false", "f", "no", "n", "0", "0.0"):
        return False
    raise InterpError(f"{what}={v!r} is not a boolean; use true/false, yes/no or 1/0")


def _polarity_word(v: Any) -> bool:
    text = str(v).strip().lower()
    if text in ("same", "preserved", "kept", "positive", "true", "1", "yes"):
        return True
    if text in ("inverted", "flipped", "reversed", "opposite", "negated", "false", "0", "no"):
        return False
    raise InterpError(f"polarity={v!r}; use 'same' or 'inverted'")


def _is_reference(v: Any, what: str) -> bool:
    text = str(v).strip().lower()
    if text in ("original", "reference", "source", "ref"):
        return True
    if text in ("paraphrase", "rewrite", "variant", "paraphrased"):
        return False
    return _as_bool(v, what)


def _as_list(v: Any, what: str) -> list[Any]:
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            out = json.loads(v)
        except json.JSONDecodeError:
            raise InterpError(f"{what} is not a valid JSON list: {v[:60]!r}") from None
        if isinstance(out, list):
            return out
    raise InterpError(f"{what} must be a list (in CSV: a JSON list such as [\"Is there ...?\", \"Any ...?\"]), "
                      f"got {str(v)[:60]!r}")


class _Columns:
    """Resolves our field names to the columns of one file (aliases + the user's mapping)."""

    def __init__(self, columns: Iterable[str], mapping: Mapping[str, str] | None, path: Path):
        cols = list(columns)
        by_norm = {_norm_col(c): c for c in cols}
        self.col: dict[str, str] = {}
        for field_name, their in (mapping or {}).items():
            if field_name not in FIELDS:
                raise InterpError(f"mapping key {field_name!r} is not a field; use one of {', '.join(FIELDS)}")
            if their not in cols and _norm_col(their) not in by_norm:
                raise InterpError(f"mapping {field_name!r} -> {their!r}: {path} has no column {their!r} "
                                  f"(columns: {', '.join(cols)})")
            self.col[field_name] = their if their in cols else by_norm[_norm_col(their)]
        mapped = set(self.col.values())  # a column the user mapped is not also guessed for another field
        for field_name, aliases in ALIASES.items():
            if field_name in self.col:
                continue
            for alias in aliases:
                c = by_norm.get(alias)
                if c is not None and c not in mapped:
                    self.col[field_name] = c
                    break
        # one column guessed as both the pair id and the group (only question_id): rows sharing it are the
        # rewrites of one question, which the pair layout reads from repeated ids
        if "group" not in (mapping or {}) and self.col.get("group") is not None \
                and self.col.get("group") == self.col.get("id"):
            del self.col["group"]

    def has(self, field_name: str) -> bool:
        return field_name in self.col

    def get(self, row: Mapping[str, Any], field_name: str) -> Any:
        c = self.col.get(field_name)
        v = row.get(c) if c is not None else None
        return None if _is_empty(v) else v

    def text(self, row: Mapping[str, Any], field_name: str) -> str | None:
        """The cell as stripped text (None when empty); a list or object is an error, not its repr."""
        v = self.get(row, field_name)
        if isinstance(v, (list, tuple, dict)):
            hint = (" Several phrasings of one question go in a 'questions' list column (one group per row) "
                    "or in rows that share a group id (one phrasing per row)."
                    if field_name in ("question_a", "question_b", "question") else "")
            raise InterpError(f"column {self.col[field_name]!r} holds a {type(v).__name__} ({str(v)[:60]}); "
                              f"expected one text value.{hint}")
        return _text(v)


def _polarity_of(cols: _Columns, row: Mapping[str, Any]) -> bool | None:
    same = cols.get(row, "same_polarity")
    if same is not None:
        return _as_bool(same, cols.col["same_polarity"])
    inv = cols.get(row, "inverted")
    if inv is not None:
        return not _as_bool(inv, cols.col["inverted"])
    pol = cols.get(row, "polarity")
    if pol is not None:
        return _polarity_word(pol)
    return None


def _text(v: Any) -> str | None:
    return None if v is None else str(v).strip() or None


def load_pairs(path: str | Path, *, mapping: Mapping[str, str] | None = None, image_root: str | Path | None = None,
               check_images: bool = True, encoding: str = "utf-8") -> list[ParaphrasePair]:
    """Read paraphrase pairs from JSONL/JSON/CSV/TSV (PSF-Med-style columns; ``mapping`` for other layouts).

    Three layouts are recognised from the columns: one pair per row (``question_a``/``question_b``; rows that
    share an ``id`` are rewrites of one question and become a group), one group per row (a ``questions``
    list, optional ``polarities``/``kinds`` lists) and one phrasing per row (``question`` + ``group``; the row
    flagged ``is_original`` or else the first row of a group is the reference). ``mapping`` maps our field
    names to yours, e.g. ``{"question_b": "rewrite", "image": "jpg"}``. Relative image paths are resolved
    against ``image_root`` (default: the file's folder); missing images and files that do not open as images
    are reported here, before any model work. ``inverted`` is the opposite of ``same_polarity``; a pair whose
    polarity the file does not give, with a negation cue on one side only, gets a `PolarityWarning`.
    ``question_id``-style columns (beside a per-row ``pair_id``) are read as the question group and
    ``study_id``/``subject_id``/``image_id``-style columns as the case; `split` and the statistics keep
    pairs that share either together. ``encoding`` is the file's text encoding (default UTF-8).
    """
    path = _path(path, "path")
    if not path.is_file():
        raise InterpError(f"pair file not found: '{path}'")
    rows = _read_all_rows(path, encoding)
    if not rows:
        raise InterpError(f"{path} has no rows")
    columns: dict[str, None] = {}
    for _, row in rows:
        columns.update(dict.fromkeys(row))
    cols = _Columns(columns, mapping, path)
    root = Path(image_root) if image_root is not None else path.parent

    def where(lineno: int) -> str:
        return f"{path}:{lineno}"

    def image_of(row: Mapping[str, Any]) -> str | None:
        v = cols.text(row, "image")
        if v is None:
            return None
        p = Path(v).expanduser()
        return str(p if p.is_absolute() else (root / p))

    defaulted: set[str] = set()  # pairs whose polarity the file did not give (read as same polarity)
    if cols.has("questions"):
        pairs = _from_group_rows(rows, cols, where, image_of, defaulted)
    elif cols.has("question_b") and cols.has("question_a") and cols.col["question_a"] != cols.col["question_b"]:
        pairs = _from_pair_rows(rows, cols, where, image_of, defaulted)
    elif cols.has("question") and (cols.has("group") or cols.has("id")):
        pairs = _from_long_rows(rows, cols, where, image_of, defaulted)
    else:
        raise InterpError(f"{path}: cannot tell the layout from columns {', '.join(columns)}. Expected "
                          "question_a + question_b (a pair per row), questions (a list per row) or question + "
                          "group (a phrasing per row); pass mapping={'question_b': 'your_column', ...}")
    seen: dict[str, int] = {}
    for p in pairs:
        seen[p.id] = seen.get(p.id, 0) + 1
    dups = [i for i, c in seen.items() if c > 1]
    if dups:
        raise InterpError(f"{path}: pair id {dups[0]!r} occurs {seen[dups[0]]} times; ids must be unique "
                          "(rows that share an id are read as rewrites of one question only in the pair layout)")
    if check_images:
        check_image_files(pairs, source=str(path))
    warn_polarity([p for p in pairs if p.id in defaulted], source=str(path))
    return pairs


def check_image_files(pairs: Iterable[ParaphrasePair], *, source: str = "pairs") -> None:
    """Raise one InterpError listing every image file that does not exist or that PIL cannot open."""
    from PIL import Image

    missing, dicom, unreadable = [], [], []
    for img in dict.fromkeys(p.image for p in pairs if isinstance(p.image, str)):
        if img.lower().endswith(".dcm"):
            dicom.append(img)
        elif not Path(img).is_file():
            missing.append(img)
        else:
            try:
                with Image.open(img) as im:
                    im.verify()  # reads the whole file: truncated or corrupt images fail here, not mid-run
            except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
                unreadable.append(f"{img} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise InterpError(f"{source}: {len(missing)} image file(s) not found:\n  {shown}\nPass image_root= the "
                          "folder that relative paths start from, fix the paths, or check_images=False.")
    if dicom:
        raise InterpError(f"{source}: {len(dicom)} DICOM image(s) (e.g. '{dicom[0]}'); convert them to PNG/JPG "
                          "(MIMIC-CXR-JPG paths, or pydicom + PIL) and point the image column at those files")
    if unreadable:
        shown = "\n  ".join(unreadable[:10]) + (f"\n  ... and {len(unreadable) - 10} more"
                                                if len(unreadable) > 10 else "")
        raise InterpError(f"{source}: {len(unreadable)} image file(s) cannot be opened as images:\n  {shown}\n"
                          "Re-export them as PNG or JPEG (or fix the image column if it points at other files).")


# ---- polarity: a rewrite that negates the question inverts its answer ------------------------------------
class PolarityWarning(UserWarning):
    """Pairs look polarity-inverting (negation on one side only) but were read as same polarity."""


# Words and phrases that usually negate or invert a yes/no finding question ("Is there no effusion?",
# "Can an effusion be ruled out?"); matched as whole words, case-insensitively.
NEGATION_CUES = ("no", "not", "n't", "none", "never", "neither", "nor", "without", "absent", "absence",
                 "negative for", "rule out", "ruled out", "rules out", "exclude", "excluded", "excludes",
                 "excluding", "free of", "clear of", "lack", "lacks", "lacking", "deny", "denies", "denied")
_NEG_RE = re.compile(r"n't\b|(?<![\w'])(?:" + "|".join(re.escape(c).replace(r"\ ", r"\s+")
                                                         for c in NEGATION_CUES if c != "n't") + r")(?![\w'])",
                     re.IGNORECASE)


def negation_cues(text: str) -> list[str]:
    """The negation cues (``NEGATION_CUES``) in ``text``, lower-cased, in order."""
    return [re.sub(r"\s+", " ", m.group(0).lower()) for m in _NEG_RE.finditer(str(text))]


def polarity_suspects(pairs: Iterable[ParaphrasePair]) -> list[ParaphrasePair]:
    """Same-polarity pairs whose phrasings carry negation cues on one side only: each may invert the answer,
    and scored as same polarity a perfectly consistent model would flip on it."""
    return [p for p in pairs if p.same_polarity and bool(negation_cues(p.question_a)) != bool(negation_cues(p.question_b))]


def warn_polarity(pairs: Iterable[ParaphrasePair], *, source: str = "pairs") -> list[ParaphrasePair]:
    """Warn (`PolarityWarning`, naming the pairs) about ``polarity_suspects(pairs)``; returns them. Call it on
    pairs whose polarity was not given (``load_pairs`` does)."""
    suspects = polarity_suspects(pairs)
    if suspects:
        shown = "; ".join(f"{p.id}: {p.question_a!r} vs {p.question_b!r}" for p in suspects[:5])
        more = f"; ... and {len(suspects) - 5} more" if len(suspects) > 5 else ""
        warnings.warn(f"{source}: {len(suspects)} pair(s) have a negation cue on one side only but no polarity was "
                      f"given, so they are scored as same polarity: {shown}{more}. If a rewrite inverts the answer, "
                      "give it same_polarity=false (or inverted=true); if not, give same_polarity=true to silence "
                      "this.", PolarityWarning, stacklevel=3)
    return suspects


def _row_error(where: str, e: InterpError) -> InterpError:
    return InterpError(f"{where}: {e}")


def _from_pair_rows(rows, cols: _Columns, where, image_of, defaulted: set[str]) -> list[ParaphrasePair]:
    parsed = []
    for lineno, row in rows:
        try:
            qa, qb = cols.text(row, "question_a"), cols.text(row, "question_b")
            if qa is None or qb is None:
                missing = cols.col.get("question_a" if qa is None else "question_b", "question_a/question_b")
                raise InterpError(f"empty or missing {missing!r}; every row needs both phrasings")
            answer = normalize_answer(cols.get(row, "answer"))
            answer_b = normalize_answer(cols.get(row, "answer_b"))
            same = _polarity_of(cols, row)
            if answer_b is not None and answer is not None:
                if same is None:
                    same = answer_b == answer
                elif (answer_b == answer) != same:
                    raise InterpError(f"answer {answer!r}, answer_b {answer_b!r} and same_polarity={same} disagree")
            rid = cols.text(row, "id")
            parsed.append(dict(line=lineno, id=rid, group=cols.text(row, "group"), question_a=qa,
                               question_b=qb, answer=answer, image=image_of(row),
                               same_polarity=True if same is None else same, polarity_given=same is not None,
                               kind=cols.text(row, "kind") or "", context=cols.text(row, "context"),
                               case=cols.text(row, "case")))
        except InterpError as e:
            raise _row_error(where(lineno), e) from None
    counts: dict[str, int] = {}
    for r in parsed:
        if r["id"] is not None:
            counts[r["id"]] = counts.get(r["id"], 0) + 1
    first: dict[str, dict] = {}
    index: dict[str, int] = {}
    pairs = []
    for r in parsed:
        rid, group = r["id"], r["group"]
        if rid is None:
            rid = f"row{r['line']}"
        elif counts[rid] > 1 and group is None:
            # PSF-Med exports list each rewrite of a question on its own row under the question's id
            ref = first.setdefault(rid, r)
            for key in ("question_a", "image", "context", "answer", "case"):
                if r[key] != ref[key]:
                    raise InterpError(f"{where(r['line'])}: rows with id {rid!r} are rewrites of one question but "
                                      f"{key} differs from line {ref['line']} ({r[key]!r} vs {ref[key]!r})")
            index[rid] = index.get(rid, 0) + 1
            group, rid = rid, f"{rid}#{index[rid]}"
        try:
            pairs.append(ParaphrasePair(id=rid, question_a=r["question_a"], question_b=r["question_b"],
                                        answer=r["answer"], image=r["image"], same_polarity=r["same_polarity"],
                                        kind=r["kind"], context=r["context"], group=group, case=r["case"]))
        except InterpError as e:
            raise _row_error(where(r["line"]), e) from None
        if not r["polarity_given"]:
            defaulted.add(rid)
    return pairs


def _from_group_rows(rows, cols: _Columns, where, image_of, defaulted: set[str]) -> list[ParaphrasePair]:
    pairs = []
    for lineno, row in rows:
        try:
            questions = _as_list(cols.get(row, "questions"), cols.col["questions"])
            for k, q in enumerate(questions):
                if not isinstance(q, str):
                    raise InterpError(f"{cols.col['questions']!r} entry {k} is a {type(q).__name__} "
                                      f"({str(q)[:60]}); every phrasing must be a string")
            questions = [q.strip() for q in questions]
            gid = cols.text(row, "group") or cols.text(row, "id") or f"row{lineno}"
            polarities: list[bool] = []  # per phrasing, from a same-polarity list or an inverted list
            if (raw := cols.get(row, "polarities")) is not None:
                polarities = [_as_bool(v, "polarities") for v in _as_list(raw, cols.col["polarities"])]
            elif (raw := cols.get(row, "same_polarity")) is not None:
                polarities = [_as_bool(v, "same_polarity") for v in _as_list(raw, cols.col["same_polarity"])]
            elif (raw := cols.get(row, "inverted")) is not None:
                polarities = [not _as_bool(v, "inverted") for v in _as_list(raw, cols.col["inverted"])]
            kinds_raw = cols.get(row, "kinds")
            kinds = [str(k) for k in _as_list(kinds_raw, cols.col["kinds"])] if kinds_raw is not None else []
            group = ParaphraseGroup(id=gid, questions=tuple(questions), polarities=tuple(polarities),
                                    answer=normalize_answer(cols.get(row, "answer")), image=image_of(row),
                                    kind=cols.text(row, "kind") or "",
                                    context=cols.text(row, "context"), kinds=tuple(kinds),
                                    case=cols.text(row, "case"))
        except InterpError as e:
            raise _row_error(where(lineno), e) from None
        pairs.extend(group.pairs())
        if not polarities:
            defaulted.update(p.id for p in group.pairs())
    return pairs


def _from_long_rows(rows, cols: _Columns, where, image_of, defaulted: set[str]) -> list[ParaphrasePair]:
    key_field = "group" if cols.has("group") else "id"
    members: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for lineno, row in rows:
        try:
            q = cols.text(row, "question")
            gid = cols.text(row, key_field)
            if q is None or gid is None:
                raise InterpError(f"needs both a phrasing ({cols.col.get('question')!r}) and a group id "
                                  f"({cols.col.get(key_field)!r})")
            ref = cols.get(row, "is_reference")
            is_ref = None if ref is None else _is_reference(ref, cols.col["is_reference"])
            members.setdefault(gid, []).append((lineno, dict(
                question=q, answer=normalize_answer(cols.get(row, "answer")), same=_polarity_of(cols, row),
                image=image_of(row), context=cols.text(row, "context"), case=cols.text(row, "case"),
                kind=cols.text(row, "kind") or "", is_ref=is_ref)))
        except InterpError as e:
            raise _row_error(where(lineno), e) from None
    pairs = []
    for gid, rows_g in members.items():
        refs = [i for i, (_, r) in enumerate(rows_g) if r["is_ref"]]
        if len(refs) > 1:
            raise InterpError(f"{where(rows_g[refs[1]][0])}: group {gid!r} has two reference rows "
                              f"(lines {rows_g[refs[0]][0]} and {rows_g[refs[1]][0]}); flag exactly one")
        k = refs[0] if refs else 0
        ordered = [rows_g[k]] + rows_g[:k] + rows_g[k + 1:]
        (ref_line, ref), rest = ordered[0], ordered[1:]
        if ref["same"] is False:
            raise InterpError(f"{where(ref_line)}: the reference phrasing of group {gid!r} is marked inverted; "
                              "polarity is relative to the reference, so flag the reference as same polarity")
        answer = ref["answer"]
        polarities = [True]
        guessed = []  # phrasings whose polarity neither a column nor two gold answers gave
        for lineno, r in rest:
            for key in ("image", "context", "case"):
                if r[key] != ref[key]:
                    raise InterpError(f"{where(lineno)}: group {gid!r}: {key} {r[key]!r} differs from the "
                                      f"reference row (line {ref_line}: {ref[key]!r}); one group, one {key}")
            same = r["same"]
            guessed.append(same is None and (r["answer"] is None or answer is None))
            if same is None:
                same = True if guessed[-1] else r["answer"] == answer
            elif r["answer"] is not None and answer is not None and (r["answer"] == answer) != same:
                raise InterpError(f"{where(lineno)}: answer {r['answer']!r} and polarity disagree with the "
                                  f"reference answer {answer!r} (line {ref_line})")
            if answer is None and r["answer"] is not None:
                answer = r["answer"] if same else _flip(r["answer"])
            polarities.append(same)
        if not rest:
            raise InterpError(f"{where(ref_line)}: group {gid!r} has a single phrasing; a group needs two or more")
        try:
            group = ParaphraseGroup(id=gid, questions=tuple(r["question"] for _, r in ordered),
                                    polarities=tuple(polarities), answer=answer, image=ref["image"],
                                    context=ref["context"], kinds=tuple(r["kind"] for _, r in ordered),
                                    case=ref["case"])
        except InterpError as e:
            raise _row_error(where(ref_line), e) from None
        pairs.extend(group.pairs())
        defaulted.update(p.id for p, g in zip(group.pairs(), guessed, strict=True) if g)
    return pairs


def check_pairs(pairs: Iterable[Any], *, name: str = "pairs", minimum: int = 1) -> list[ParaphrasePair]:
    """``pairs`` as a list, with a clear error when there are too few or they are not ParaphrasePairs."""
    items = list(pairs)
    if len(items) < minimum:
        what = "is empty" if not items else f"has {len(items)} pair(s)"
        need = "at least one pair" if minimum == 1 else f"at least {minimum} pairs"
        raise InterpError(f"{name} {what}; pass {need} (e.g. interp.data.builtin('register'))")
    bad = [type(p).__name__ for p in items if not isinstance(p, ParaphrasePair)]
    if bad:
        raise InterpError(f"{name} must hold ParaphrasePair objects, got a {bad[0]}; load them with "
                          "interp.data.load_pairs(path) or interp.data.builtin('register')")
    return items


# ---- clusters and the leak-free split ------------------------------------------------------------------
# What makes two pairs dependent: the same question (group), image, case (study/patient), report (context),
# or one identical prompt (phrasing + image + report), whose margin both pairs then share.
CLUSTER_KEYS = ("group", "image", "case", "context", "prompt")


def _components(links: Sequence[Iterable[Any]]) -> list[int]:
    """Connected components of units that share a link value: ``links[i]`` are unit i's values; returns the
    smallest unit index of each unit's component (union-find with path halving)."""
    parent = list(range(len(links)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Any, int] = {}
    for i, values in enumerate(links):
        for v in values:
            ri, rj = find(i), find(owner.setdefault(v, i))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(links))]


def _cluster_components(pairs: Sequence[ParaphrasePair], by: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(cluster label per pair, key -> number of its values shared by more than one pair)."""
    unknown = [k for k in by if k not in CLUSTER_KEYS]
    if unknown or isinstance(by, str):
        raise InterpError(f"by={by!r}: cluster keys are a tuple drawn from {CLUSTER_KEYS}")
    links: list[set] = [set() for _ in pairs]
    shared: dict[str, int] = {}
    for key in by:
        count: dict[Any, int] = {}
        for i, p in enumerate(pairs):
            if key == "prompt":
                values = {(" ".join(q.lower().split()), p.image, p.context) for q in (p.question_a, p.question_b)}
            else:
                v = getattr(p, key)
                values = set() if v is None else {v}
            for v in values:
                count[v] = count.get(v, 0) + 1
                links[i].add((key, v))  # values of different keys never link to each other
        shared[key] = sum(c > 1 for c in count.values())
    return [pairs[r].id for r in _components(links)], shared


def clusters(pairs: Iterable[ParaphrasePair], *, by: Sequence[str] = CLUSTER_KEYS) -> list[str]:
    """One cluster label per pair (the id of the cluster's first pair): connected components of pairs that
    share a question group, an image, a case, a report or an identical prompt (``by`` picks the keys).
    Pairs in one cluster are not independent; the statistics resample and test whole clusters."""
    return _cluster_components(list(pairs), tuple(by))[0]


@dataclass(frozen=True)
class SplitReport:
    """What `split` kept together: clusters of pairs that share a question group, image, case, report or prompt."""

    n_pairs: int
    n_train: int  # pairs on the training side
    n_held: int  # pairs on the held-out side
    n_clusters: int  # connected components over the keys in ``by``
    n_clusters_train: int
    n_clusters_held: int
    largest: int  # pairs in the largest cluster
    by: tuple[str, ...]  # keys that link pairs
    shared: dict[str, int] = field(default_factory=dict)  # key -> values shared by two or more pairs
    eval_fraction: float = 0.3  # asked-for share of held-out pairs
    seed: int = 0

    def __repr__(self) -> str:
        links = ", ".join(f"{k}: {v}" for k, v in self.shared.items() if v) or "nothing shared"
        return (f"SplitReport({self.n_pairs} pairs in {self.n_clusters} clusters (largest {self.largest} pairs; "
                f"shared values by key: {links}): train {self.n_train} pairs in {self.n_clusters_train} clusters, "
                f"held-out {self.n_held} pairs in {self.n_clusters_held} clusters ({self.n_held / self.n_pairs:.0%}, "
                f"asked {self.eval_fraction:.0%}); no cluster on both sides)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Split(tuple):
    """``(train, held)``, unpacking as a 2-tuple, with the `SplitReport` as ``.report``."""

    report: SplitReport

    def __new__(cls, train: list[ParaphrasePair], held: list[ParaphrasePair], report: SplitReport) -> Split:
        obj = super().__new__(cls, (train, held))
        obj.report = report
        return obj

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle rebuild it with its report
        return (self[0], self[1], self.report)

    @property
    def train(self) -> list[ParaphrasePair]:
        return self[0]

    @property
    def held(self) -> list[ParaphrasePair]:
        return self[1]


def split(pairs: Sequence[ParaphrasePair], eval_fraction: float = 0.3, *, seed: int = 0,
          by: Sequence[str] = CLUSTER_KEYS) -> Split:
    """A seeded, leak-free (train, held-out) split: whole clusters (`clusters`: shared question group, image,
    case, report or prompt) go to one side, so no question, image or case is on both. About ``eval_fraction``
    of the pairs are held out (whole clusters are never cut); both sides are non-empty. Unpacks as
    ``train, held = split(...)``; ``.report`` is a `SplitReport` of what was grouped."""
    pairs = list(pairs)
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise InterpError(f"eval_fraction={eval_fraction!r} must be a number between 0 and 1 (e.g. 0.3)")
    labels, shared = _cluster_components(pairs, tuple(by))
    members: dict[str, list[int]] = {}
    for i, c in enumerate(labels):
        members.setdefault(c, []).append(i)
    if len(members) < 2:
        what = ", ".join(f"{k}" for k, v in shared.items() if v) or "nothing"
        raise InterpError(f"cannot split: the {len(pairs)} pair(s) form {len(members)} cluster(s) (linked by: {what}), "
                          "and a cluster never straddles train and held-out. Pass more pairs, explicit eval_pairs, "
                          f"or by= without the key that joins them (keys: {CLUSTER_KEYS})")
    keys = list(members)
    random.Random(seed).shuffle(keys)
    n = len(pairs)
    target = min(n - 1, max(1, round(n * eval_fraction)))
    held_keys, n_held = set(), 0
    for k in keys:  # first fit in shuffled order: whole clusters, never past the target
        if n_held + len(members[k]) <= target:
            held_keys.add(k)
            n_held += len(members[k])
    if not held_keys:  # every cluster is larger than the target: hold out the smallest one
        held_keys = {min(keys, key=lambda k: len(members[k]))}
    train = [p for p, c in zip(pairs, labels, strict=True) if c not in held_keys]
    held = [p for p, c in zip(pairs, labels, strict=True) if c in held_keys]
    report = SplitReport(n_pairs=n, n_train=len(train), n_held=len(held), n_clusters=len(members),
                         n_clusters_train=len(members) - len(held_keys), n_clusters_held=len(held_keys),
                         largest=max(len(v) for v in members.values()), by=tuple(by), shared=shared,
                         eval_fraction=float(eval_fraction), seed=seed)
    return Split(train, held, report)


def take(pairs: Sequence[ParaphrasePair], limit: int | None, *, seed: int | None = None) -> list[ParaphrasePair]:
    """The first ``limit`` pairs (after a seeded shuffle when ``seed`` is given); ``None`` keeps all. A limit
    of 0, a negative or a non-integer limit is an error (not "all" or "all but N")."""
    pairs = list(pairs)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise InterpError(f"limit={limit!r} must be a positive whole number of pairs (or None for all "
                          f"{len(pairs)} pairs)")
    if seed is not None:
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        pairs = [pairs[i] for i in order]
    return pairs if limit is None else pairs[:int(limit)]
