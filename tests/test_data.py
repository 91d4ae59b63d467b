"""Paraphrase data: the built-in set, PSF-Med-style loading (JSONL/CSV, mappings, groups), errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from interp import InterpError
from interp.data import ParaphraseGroup, ParaphrasePair, builtin, groups_of, load_pairs, normalize_answer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def images(tmp_path) -> list[str]:
    """Two tiny PNGs in tmp_path/img (relative paths 'img/a.png', 'img/b.png')."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    out = []
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "img" / name)
        out.append(f"img/{name}")
    return out


def test_builtin_register_set_is_large_clinical_and_has_inverted_polarity():
    pairs = builtin("register")
    assert len(pairs) >= 150
    assert len({p.id for p in pairs}) == len(pairs)
    inverted = [p for p in pairs if not p.same_polarity]
    assert 10 <= len(inverted) < len(pairs) / 2
    assert all(p.answer_b == {"yes": "no", "no": "yes"}[p.answer] for p in inverted if p.answer)
    assert sum(p.answer is not None for p in pairs) >= 100
    assert all(p.question_a != p.question_b for p in pairs)
    assert all(p.context for p in pairs if p.answer is not None)  # gold answers refer to a synthetic case
    with pytest.raises(InterpError, match="available: 'register'"):
        builtin("lexical")


@pytest.mark.parametrize("raw, want", [("Yes", "yes"), ("NO", "no"), ("true", "yes"), ("False", "no"), (1, "yes"),
                                       ("0", "no"), (True, "yes"), ("", None), (None, None), ("yes.", "yes")])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def test_normalize_answer_rejects_non_binary():
    with pytest.raises(InterpError, match="'maybe' is not a yes/no answer"):
        normalize_answer("maybe")


def test_jsonl_psf_med_columns_and_relative_images(tmp_path, images):
    rows = [
        dict(pair_id="m1", original_question="Is there a pleural effusion?", paraphrased_question="Is there fluid?",
             label="True", image_path=images[0], polarity_preserved=True, paraphrase_type="lexical",
             report="Small effusion."),
        dict(pair_id="m2", original_question="Is there pneumothorax?", paraphrased_question="Can PTX be ruled out?",
             label="0", image_path=images[1], polarity_preserved="false", paraphrase_type="negation"),
    ]
    pairs = load_pairs(write_jsonl(tmp_path / "psf.jsonl", rows))
    assert [p.id for p in pairs] == ["m1", "m2"]
    a, b = pairs
    assert (a.question_a, a.question_b, a.answer, a.kind, a.context) == (
        "Is there a pleural effusion?", "Is there fluid?", "yes", "lexical", "Small effusion.")
    assert a.same_polarity and not b.same_polarity
    assert (b.answer, b.answer_b, b.context) == ("no", "yes", None)
    assert a.image == str(tmp_path / images[0]) and Path(a.image).is_file()


def test_csv_with_quoted_commas_and_inverted_column(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["id", "q1", "q2", "gold", "inverted", "category"], [
        ["c1", "Is there cardiomegaly, or a normal heart?", "Is the heart big?", "yes", "0", "register"],
        ["c2", "Is there an effusion?", "Can effusion be excluded?", "no", "1", "negation"],
    ])
    a, b = load_pairs(path)
    assert a.question_a == "Is there cardiomegaly, or a normal heart?" and a.same_polarity
    assert not b.same_polarity and b.kind == "negation" and b.answer == "no"


def test_mapping_for_other_layouts(tmp_path):
    path = write_csv(tmp_path / "odd.csv", ["key", "formal", "lay", "truth", "flipped"], [
        ["k1", "Is there consolidation?", "Is there pneumonia?", "Y", "no"]])
    (p,) = load_pairs(path, mapping={"id": "key", "question_a": "formal", "question_b": "lay", "answer": "truth",
                                     "inverted": "flipped"})
    assert (p.id, p.question_a, p.question_b, p.answer, p.same_polarity) == (
        "k1", "Is there consolidation?", "Is there pneumonia?", "yes", True)
    with pytest.raises(InterpError, match="has no column 'nope'"):
        load_pairs(path, mapping={"question_a": "nope"})
    with pytest.raises(InterpError, match="mapping key 'question_c' is not a field"):
        load_pairs(path, mapping={"question_c": "formal"})
    with pytest.raises(InterpError, match="cannot tell the layout"):
        load_pairs(path)


def test_pair_rows_sharing_a_question_id_become_a_group(tmp_path):
    rows = [dict(question_id="q7", original_question="Is there edema?", paraphrased_question=b, answer="yes",
                 inverted=inv, paraphrase_type=k)
            for b, inv, k in (("Any edema?", False, "lexical"), ("Is edema absent?", True, "negation"),
                              ("Edema present?", False, "syntactic"))]
    rows.append(dict(question_id="q8", original_question="Is there a mass?", paraphrased_question="Any mass?",
                     answer="no"))
    pairs = load_pairs(write_jsonl(tmp_path / "g.jsonl", rows))
    assert [p.id for p in pairs] == ["q7#1", "q7#2", "q7#3", "q8"]
    assert [p.group for p in pairs] == ["q7", "q7", "q7", None]
    assert [p.same_polarity for p in pairs] == [True, False, True, True]
    (group, single) = groups_of(pairs)
    assert group.id == "q7" and group.questions == ("Is there edema?", "Any edema?", "Is edema absent?",
                                                    "Edema present?")
    assert group.polarities == (True, True, False, True) and len(single) == 2
    rows[1]["original_question"] = "Is there oedema?"
    with pytest.raises(InterpError, match=r"g2\.jsonl:2: rows with id 'q7' .* question_a differs from line 1"):
        load_pairs(write_jsonl(tmp_path / "g2.jsonl", rows))


def test_group_rows_with_a_list_of_phrasings(tmp_path, images):
    rows = [dict(id="g1", questions=["Is there a pneumothorax?", "Any collapsed lung?", "Is PTX excluded?"],
                 polarities=[True, True, False], answer="no", image=images[0], kinds=["", "register", "negation"]),
            dict(id="g2", questions=["Is the heart enlarged?", "Big heart?"], answer="yes", kind="register")]
    pairs = load_pairs(write_jsonl(tmp_path / "rows.jsonl", rows))
    assert [p.id for p in pairs] == ["g1#1", "g1#2", "g2#1"]
    assert all(p.question_a == "Is there a pneumothorax?" for p in pairs[:2])
    assert [p.same_polarity for p in pairs] == [True, False, True]
    assert [p.kind for p in pairs] == ["register", "negation", "register"]
    assert pairs[1].answer_b == "yes" and pairs[0].group == "g1"
    # the same layout in CSV, lists as JSON cells
    path = write_csv(tmp_path / "rows.csv", ["id", "questions", "inverted", "answer"], [
        ["g1", json.dumps(["Is there a pneumothorax?", "Is PTX excluded?"]), json.dumps([False, True]), "no"]])
    (p,) = load_pairs(path)
    assert (p.id, p.same_polarity, p.answer_b) == ("g1#1", False, "yes")


def test_long_rows_one_phrasing_each(tmp_path):
    rows = [dict(group_id="x", question="Any fluid in the lungs?", is_original=False, answer="yes"),
            dict(group_id="x", question="Is there a pleural effusion?", is_original=True, answer="yes"),
            dict(group_id="x", question="Can effusion be ruled out?", is_original=False, answer="no"),
            dict(group_id="y", question="Is there a fracture?", kind="orig"),
            dict(group_id="y", question="Broken rib?", kind="register", inverted=False)]
    pairs = load_pairs(write_jsonl(tmp_path / "long.jsonl", rows))
    assert [p.id for p in pairs] == ["x#1", "x#2", "y#1"]
    x1, x2, y1 = pairs
    assert x1.question_a == "Is there a pleural effusion?" and x1.question_b == "Any fluid in the lungs?"
    assert x1.same_polarity and not x2.same_polarity  # inferred from the per-row answers
    assert (x1.answer, x2.answer_b) == ("yes", "no") and y1.answer is None and y1.kind == "register"
    rows[0]["is_original"] = True
    with pytest.raises(InterpError, match=r"long2\.jsonl:2: group 'x' has two reference rows"):
        load_pairs(write_jsonl(tmp_path / "long2.jsonl", rows))


@pytest.mark.parametrize("content, match", [
    ('{"id": "a", "question_a": "Is there?", "question_b": "Any?"}\n\n{"id": "b", "question_a": "Q?", '
     '"question_b": "R?"}\n{not json}\n', r"bad\.jsonl:4: invalid JSON"),
    ('{"id": "a", "question_a": "Is there?", "question_b": "Any?", "answer": "maybe"}\n',
     r"bad\.jsonl:1: answer 'maybe' is not a yes/no answer"),
    ('{"id": "a", "question_a": "Is there?", "question_b": ""}\n', r"bad\.jsonl:1: empty or missing 'question_b'"),
    ('["a", "b"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('{"id": "a", "question_a": "Q?", "question_b": "R?", "same_polarity": "perhaps"}\n',
     r"bad\.jsonl:1: same_polarity='perhaps' is not a boolean"),
])
def test_malformed_jsonl_rows_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InterpError, match=match):
        load_pairs(path)


def test_malformed_csv_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('id,question_a,question_b,answer\nr1,"Is there, at all?",Any?,yes\n'
                    'r2,"A question\nover two lines?",B?,no\nr3,Q?,R?\nr4,Q?,,yes\n')
    with pytest.raises(InterpError, match=r"bad\.csv:5: 3 cells but the header has 4 columns"):
        load_pairs(path)
    path.write_text('id,question_a,question_b,answer\nr1,Q?,R?,yes\n\nr4,Q?,,yes\n')
    with pytest.raises(InterpError, match=r"bad\.csv:4: empty or missing 'question_b'"):
        load_pairs(path)


def test_duplicate_pair_ids_are_rejected(tmp_path):
    rows = [dict(id="a", group="g", question_a="Q?", question_b="R?"),
            dict(id="a", group="g", question_a="Q?", question_b="S?")]
    with pytest.raises(InterpError, match="pair id 'a' occurs 2 times"):
        load_pairs(write_jsonl(tmp_path / "dup.jsonl", rows))


def test_missing_images_are_listed_at_load_time(tmp_path, images):
    rows = [dict(id=f"r{i}", question_a="Q?", question_b="R?", image=img)
            for i, img in enumerate([images[0], "img/missing1.png", "/nowhere/missing2.png"])]
    path = write_jsonl(tmp_path / "imgs.jsonl", rows)
    with pytest.raises(InterpError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert "2 image file(s) not found" in msg and "missing1.png" in msg and "/nowhere/missing2.png" in msg
    assert "a.png" not in msg
    assert len(load_pairs(path, check_images=False)) == 3
    other = tmp_path / "elsewhere"
    other.mkdir()
    (p,) = load_pairs(write_jsonl(other / "one.jsonl", rows[:1]), image_root=tmp_path)
    assert p.image == str(tmp_path / images[0])
    dcm = write_jsonl(tmp_path / "dcm.jsonl", [dict(id="d", question_a="Q?", question_b="R?", dicom_path="x.dcm")])
    with pytest.raises(InterpError, match="DICOM"):
        load_pairs(dcm)


def test_group_pairs_and_validation():
    g = ParaphraseGroup("g", ("Is there effusion?", "Any fluid?", "Is effusion absent?"), (True, True, False),
                        answer="yes", image=None, kind="mixed", context="Report.")
    pairs = g.pairs()
    assert [p.id for p in pairs] == ["g#1", "g#2"] and [p.answer_b for p in pairs] == ["yes", "no"]
    assert all(p.group == "g" and p.context == "Report." and p.kind == "mixed" for p in pairs)
    back = groups_of(pairs)[0]
    assert back.questions == g.questions and back.polarities == g.polarities and back.answer == "yes"
    with pytest.raises(InterpError, match="polarities\\[0\\] must be True"):
        ParaphraseGroup("g", ("A?", "B?"), (False, True))
    with pytest.raises(InterpError, match="2 polarities for 3 phrasings"):
        ParaphraseGroup("g", ("A?", "B?", "C?"), (True, True))
    with pytest.raises(InterpError, match="at least two"):
        ParaphraseGroup("g", ("A?",))
    with pytest.raises(InterpError, match="differ in question_a"):
        groups_of([ParaphrasePair("a", "Q?", "R?", group="g"), ParaphrasePair("b", "Q2?", "R?", group="g")])
