"""Paraphrase pairs: the same clinical yes/no question asked two ways (about the same image or case).

`ParaphrasePair` is the unit every later stage consumes; `builtin("register")` is the bundled set of
formal-vs-lay chest X-ray questions; `load_pairs()` reads PSF-Med-style JSONL or CSV exports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from interp._errors import InterpError
from interp.models import Prompt

RESOURCES = Path(__file__).parent / "resources"


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

    def __post_init__(self) -> None:
        if not str(self.question_a).strip() or not str(self.question_b).strip():
            raise InterpError(f"pair {self.id!r}: both question_a and question_b must be non-empty")
        if self.answer is not None and self.answer not in ("yes", "no"):
            raise InterpError(f"pair {self.id!r}: answer={self.answer!r}; use 'yes', 'no' or None")

    @property
    def answer_b(self) -> str | None:
        """The gold answer to ``question_b`` (flipped when the rewrite inverts polarity)."""
        if self.answer is None or self.same_polarity:
            return self.answer
        return "no" if self.answer == "yes" else "yes"

    def prompt_a(self) -> Prompt:
        return Prompt(self.question_a, self.image, self.context)

    def prompt_b(self) -> Prompt:
        return Prompt(self.question_b, self.image, self.context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def builtin(name: str = "register") -> list[ParaphrasePair]:
    """Bundled pairs. ``"register"``: chest X-ray questions, formal clinical (a) vs lay (b) register."""
    if name != "register":
        raise InterpError(f"unknown built-in pair set {name!r}; available: 'register'")
    pairs = []
    for line in (RESOURCES / "register_pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        pairs.append(ParaphrasePair(id=row["id"], question_a=row["question_a"], question_b=row["question_b"],
                                    answer=row["answer"], same_polarity=row["same_polarity"], kind=row["kind"],
                                    context=row["context"] or None))
    return pairs
