"""Labeler templates: the paper's four-part prompt, user templates from strings and files, bad templates."""

from __future__ import annotations

import json

import pytest

from rlaif_fast.feedback import BUILTIN, Template, load_template


def test_builtin_pairwise_prompt_has_the_papers_four_parts():
    t = load_template("summarization-detailed")
    text = t.render_pairwise("The text.", "S one", "S two")
    assert text.startswith(t.preamble) and "Coherence" in t.preamble
    assert "Text - The text.\nSummary 1 - S one\nSummary 2 - S two\n" in text
    assert text.endswith("Preferred Summary=")
    cot = t.render_pairwise("The text.", "S one", "S two", chain_of_thought=True)
    assert cot.endswith("Rationale:") and "Preferred Summary=" not in cot
    assert t.render_score("The text.", "S").endswith("Summary - S\nRating=")
    for name, tpl in BUILTIN.items():
        assert tpl.name == name and tpl.render_pairwise("c", "a", "b").endswith(tpl.ending)


def test_parts_isolate_the_context_for_truncation():
    t = load_template("harmlessness")
    p = t.pairwise_parts("CTX", "A", "B")
    assert p.context == "CTX" and p.text == t.render_pairwise("CTX", "A", "B")
    assert "Response 1 - A" in p.tail and p.tail.endswith(t.ending) and "CTX" not in p.head + p.tail


def test_substitution_is_one_pass_and_brace_safe():
    t = Template.from_string('JSON {"k": 1}\nQ: {context}\n1: {first}\n2: {second}\nBest=')
    text = t.render_pairwise("has {first} inside", "{second}", "b")
    assert text == 'JSON {"k": 1}\nQ: has {first} inside\n1: {second}\n2: b\nBest='


def test_few_shot_exemplars_precede_the_sample():
    t = Template(
        name="fs",
        preamble="P\n",
        sample="T {context} | {first} | {second}\n",
        ending="Best=",
        exemplars=({"context": "x", "first": "y", "second": "z", "preferred": "2"},),
    )
    assert t.render_pairwise("c", "a", "b") == "P\nT x | y | z\nBest=2\n\nT c | a | b\nBest="
    with pytest.raises(ValueError, match="exemplar 0 must have"):
        Template(
            name="fs",
            preamble="",
            sample="{context}{first}{second}",
            ending="",
            exemplars=({"context": "x"},),
        )


def test_user_templates_from_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("Dialogue: {context}\nA) {first}\nB) {second}\nWinner=", encoding="utf-8")
    assert load_template(str(txt)).render_pairwise("hi", "a", "b") == "Dialogue: hi\nA) a\nB) b\nWinner="
    js = tmp_path / "mine.json"
    js.write_text(
        json.dumps(
            {
                "preamble": "Pick.\n",
                "sample": "{context}/{first}/{second}\n",
                "ending": "=",
                "score_sample": "{context}/{response}\n",
                "score_ending": "Score=",
            }
        )
    )
    t = load_template(js)
    assert t.name == "mine" and t.render_pairwise("c", "a", "b") == "Pick.\nc/a/b\n="
    assert t.render_score("c", "r") == "c/r\nScore="
    yml = tmp_path / "mine.yaml"
    yml.write_text("sample: '{context} {first} {second}'\nending: 'X='\nbogus: 1\n")
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        load_template(yml)


def test_bad_templates_name_the_missing_placeholder():
    with pytest.raises(ValueError, match=r"placeholder \{first\} exactly once, found it 0 times"):
        Template.from_string("only {context} and {second}")
    with pytest.raises(ValueError, match=r"\{context\} exactly once, found it 2 times"):
        Template.from_string("{context} {context} {first} {second}")
    with pytest.raises(ValueError, match="neither a built-in"):
        load_template("summarisation")  # a typo of a built-in name, no placeholders
    with pytest.raises(TypeError, match="got int"):
        load_template(3)
    with pytest.raises(ValueError, match="has no score_sample"):
        Template.from_string("{context}{first}{second}").render_score("c", "r")


# -------------------- templates ending with whitespace


def test_a_template_ending_with_whitespace_is_refused():
    # BPE joins the space and the digit (" 1"): local and served backends would score different tokens
    from rlaif_fast.feedback.templates import Template

    with pytest.raises(
        ValueError, match=r"ending='Preferred Summary: ' ends with whitespace.*'Preferred Summary:'"
    ):
        Template.from_string("{context}\n1: {first}\n2: {second}\n", ending="Preferred Summary: ")
    with pytest.raises(ValueError, match="score_ending"):
        Template.from_string("{context} {first} {second}", ending="A=", score_ending="Rating=\n")
    Template.from_string("{context}\n1: {first}\n2: {second}\n", ending="Preferred Summary=")  # fine
