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


# ---- clusters and the leak-free split (issue 11) ---------------------------------------------------------
def psf_med_csv(tmp_path: Path, images: list[str]) -> Path:
    """A PSF-Med-style export: 20 questions (question_id) x 4 rewrites, each row its own pair_id; question q is
    asked about image q // 2 (10 images, two questions each)."""
    from PIL import Image

    (tmp_path / "cxr").mkdir(exist_ok=True)
    for k in range(10):
        Image.new("RGB", (8, 8), (k, 20, 30)).save(tmp_path / "cxr" / f"{k}.png")
    rows = [[f"p{q}_{r}", f"q{q}", f"Is finding {q} present?", f"Rewrite {r} of finding {q}?", "yes",
             f"cxr/{q // 2}.png", "true", "lexical"]
            for q in range(20) for r in range(4)]
    return write_csv(tmp_path / "psf.csv", ["pair_id", "question_id", "original_question", "paraphrased_question",
                                            "answer", "image_path", "same_polarity", "paraphrase_type"], rows)


def test_psf_med_question_id_is_the_group_and_the_split_is_leak_free(tmp_path, images):
    from interp.data import clusters, split

    pairs = load_pairs(psf_med_csv(tmp_path, images))
    assert pairs[0].id == "p0_0" and pairs[0].group == "q0" and len({p.group for p in pairs}) == 20
    assert len(set(clusters(pairs))) == 10  # two questions share each image
    for seed in range(5):
        s = split(pairs, 0.3, seed=seed)
        train, held = s
        assert {p.group for p in train}.isdisjoint({p.group for p in held})
        assert {p.image for p in train}.isdisjoint({p.image for p in held})
        assert len(train) + len(held) == 80 and held and train
        r = s.report
        assert (r.n_pairs, r.n_clusters, r.largest, r.n_held) == (80, 10, 8, len(held))
        assert r.n_clusters_train + r.n_clusters_held == 10 and r.shared["group"] == 20 and r.shared["image"] == 10
        assert "10 clusters" in repr(r) and json.dumps(r.to_dict())
    # grouping by the question only (images ignored) gives 20 clusters
    assert split(pairs, 0.3, by=("group",)).report.n_clusters == 20
    assert len(set(clusters(pairs, by=("group",)))) == 20


def test_clusters_link_shared_groups_images_cases_and_prompts():
    from interp.data import clusters

    pairs = [ParaphrasePair("a", "Q1?", "R1?", group="g1"), ParaphrasePair("b", "Q1?", "S1?", group="g1"),
             ParaphrasePair("c", "Q2?", "R2?", image="x.png"), ParaphrasePair("d", "Q3?", "R3?", image="x.png"),
             ParaphrasePair("e", "Q4?", "R4?", case="s9"), ParaphrasePair("f", "Q5?", "R5?", case="s9"),
             ParaphrasePair("g", "Is it big?", "R6?"), ParaphrasePair("h", "is it  BIG?", "R7?"),
             ParaphrasePair("i", "Q8?", "R8?")]
    assert clusters(pairs) == ["a", "a", "c", "c", "e", "e", "g", "g", "i"]
    assert clusters(pairs, by=("image",)) == ["a", "b", "c", "c", "e", "f", "g", "h", "i"]
    with pytest.raises(InterpError, match="cluster keys"):
        clusters(pairs, by=("colour",))


def test_study_id_is_read_as_the_case(tmp_path):
    rows = [dict(pair_id=f"r{i}", study_id=f"s{i // 2}", question_a=f"Q{i}?", question_b=f"R{i}?")
            for i in range(6)]
    pairs = load_pairs(write_jsonl(tmp_path / "cases.jsonl", rows))
    assert [p.case for p in pairs] == ["s0", "s0", "s1", "s1", "s2", "s2"] and pairs[0].group is None
    from interp.data import clusters

    assert len(set(clusters(pairs))) == 3


def test_split_refuses_a_single_cluster_and_bad_fractions():
    from interp.data import split

    pairs = [ParaphrasePair(f"p{i}", f"Q{i}?", f"R{i}?", image="same.png") for i in range(5)]
    with pytest.raises(InterpError, match=r"form 1 cluster\(s\) \(linked by: image\)"):
        split(pairs)
    for bad in (0, 1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(InterpError, match="eval_fraction"):
            split(builtin()[:10], bad)
    train, held = split(builtin(), 0.3, seed=1)
    assert len(held) == round(0.3 * len(builtin())) and not {p.id for p in train} & {p.id for p in held}


def test_take_checks_the_limit():
    from interp.data import take

    pairs = builtin()[:10]
    assert take(pairs, None) == pairs and take(pairs, 3) == pairs[:3] and take(pairs, 50) == pairs
    import random

    order = list(range(10))
    random.Random(7).shuffle(order)
    assert [p.id for p in take(pairs, 4, seed=7)] == [pairs[i].id for i in order[:4]]
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(InterpError, match="must be a positive whole number"):
            take(pairs, bad)


# ---- bad inputs named (issue 12) -------------------------------------------------------------------------
def test_non_utf8_file_names_the_file_line_and_the_fix(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("id,question_a,question_b\nr1,Is there an effusion?,Any fluid?\n"
                     "r2,Is there an opacit\u00e9?,Cloudy?\n".encode("cp1252"))
    with pytest.raises(InterpError, match=r"excel\.csv:3: byte 0xe9 .* not valid utf-8.*encoding='cp1252'"):
        load_pairs(path)
    assert load_pairs(path, encoding="cp1252")[1].question_a == "Is there an opacit\u00e9?"
    jl = tmp_path / "latin.jsonl"
    jl.write_bytes('{"id": "a", "question_a": "Opacit\u00e9?", "question_b": "R?"}\n'.encode("latin-1"))
    with pytest.raises(InterpError, match=r"latin\.jsonl:1: .*Re-save it as UTF-8"):
        load_pairs(jl)
    with pytest.raises(InterpError, match="not a known text encoding"):
        load_pairs(jl, encoding="klingon")


def test_files_that_are_not_images_are_named_at_load_time(tmp_path, images):
    (tmp_path / "img" / "notes.png").write_text("this is not a PNG")
    (tmp_path / "img" / "cut.png").write_bytes((tmp_path / images[0]).read_bytes()[:30])
    rows = [dict(id=f"r{i}", question_a="Q?", question_b="R?", image=img)
            for i, img in enumerate([images[0], "img/notes.png", "img/cut.png"])]
    with pytest.raises(InterpError, match=r"2 image file\(s\) cannot be opened as images") as err:
        load_pairs(write_jsonl(tmp_path / "imgs.jsonl", rows))
    assert "notes.png" in str(err.value) and "cut.png" in str(err.value) and "a.png" not in str(err.value)
    assert len(load_pairs(tmp_path / "imgs.jsonl", check_images=False)) == 3


def test_list_valued_questions_are_an_error_not_their_repr(tmp_path):
    rows = [dict(id="a", question_a=["Is there", "A?"], question_b="Any A?")]
    with pytest.raises(InterpError, match=r"lists\.jsonl:1: column 'question_a' holds a list"):
        load_pairs(write_jsonl(tmp_path / "lists.jsonl", rows))
    with pytest.raises(InterpError, match="question_a must be a string, got list"):
        ParaphrasePair("a", ["Is there", "A?"], "Any A?")
    with pytest.raises(InterpError, match="questions is one string"):
        ParaphraseGroup("g", "Is there A?")
    nested = [dict(id="g", questions=[["Is there", "A?"], "Any A?"])]
    with pytest.raises(InterpError, match="entry 0 is a list"):
        load_pairs(write_jsonl(tmp_path / "nested.jsonl", nested))


# ---- polarity (issue 11) ---------------------------------------------------------------------------------
def test_negation_rewrite_without_polarity_is_flagged_by_name(tmp_path):
    from interp.data import PolarityWarning, negation_cues, polarity_suspects

    assert negation_cues("Can an effusion be ruled out?") == ["ruled out"]
    assert negation_cues("Is there NO effusion, and isn't it absent?") == ["no", "n't", "absent"]
    assert negation_cues("Is the note normal?") == []  # "no" inside a word is not a cue
    rows = [dict(id="neg", question_a="Is there an effusion?", question_b="Is there no effusion?"),
            dict(id="ok", question_a="Is there an effusion?", question_b="Is there fluid?"),
            dict(id="both", question_a="Is there no mass?", question_b="Is a mass absent?")]
    with pytest.warns(PolarityWarning, match=r"1 pair\(s\) have a negation cue on one side only.*neg: "):
        pairs = load_pairs(write_jsonl(tmp_path / "nopol.jsonl", rows))
    assert [p.id for p in polarity_suspects(pairs)] == ["neg"]
    rows[0]["same_polarity"] = False  # given: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PolarityWarning)
        load_pairs(write_jsonl(tmp_path / "pol.jsonl", [rows[0]]))
    long = [dict(group="x", question="Is there an effusion?"), dict(group="x", question="Can effusion be excluded?")]
    with pytest.warns(PolarityWarning, match="x#1"):
        load_pairs(write_jsonl(tmp_path / "long.jsonl", long))
