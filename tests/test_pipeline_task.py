"""The embedded task: its ground truth, its prompts and its word-level tokenizer."""

import random

import pytest

from rlaif_fast.pipeline import task as T


def test_ground_truth_by_hand():
    p = T.make_prompt("cat")
    # polarity = (pos - neg) / (pos + neg + 1); topic +-1; score = 0.8 polarity + 0.2 topic
    assert T.ground_truth(p, "the cat is happy .") == pytest.approx(0.8 * 0.5 + 0.2)
    assert T.ground_truth(p, "the cat is happy and kind .") == pytest.approx(0.8 * 2 / 3 + 0.2)
    assert T.ground_truth(p, "the cat is happy and sad .") == pytest.approx(0.2)
    assert T.ground_truth(p, "the dog is sad .") == pytest.approx(-0.8 * 0.5 - 0.2)
    assert T.ground_truth(p, "") == pytest.approx(-0.2)
    # the prompt's own words never count: "happy" is in the prompt
    assert T.polarity(p) == pytest.approx(0.5) and T.ground_truth(p, "the cat .") == pytest.approx(0.2)


def test_ground_truth_is_bounded_and_orders_sentiment():
    rng = random.Random(1)
    for _ in range(300):
        topic = rng.choice(T.TOPICS)
        s = T.sample_sentence(rng, topic, p_positive=rng.random())
        assert -1.0 <= T.ground_truth(T.make_prompt(topic), s) <= 1.0
    p = T.make_prompt("king")
    happy = [T.sample_sentence(rng, "king", 1.0) for _ in range(50)]
    sad = [T.sample_sentence(rng, "king", 0.0) for _ in range(50)]
    assert min(T.ground_truth_reward([p] * 50, happy)) > max(T.ground_truth_reward([p] * 50, sad))


def test_sft_corpus_leaves_room_to_improve():
    corpus = T.sft_corpus(2000, seed=0)
    mean = sum(T.ground_truth(p, c) for p, c in corpus) / len(corpus)
    assert 0.1 < mean < 0.3  # mixed sentiment: about 0.2 (the topic term), far below the ~0.75 of happy text


def test_prompt_split_is_disjoint_and_topic_of_roundtrips():
    split = T.prompt_split()
    assert not set(split.train) & set(split.eval)
    assert len(split.train) + len(split.eval) == len(T.TOPICS)
    assert [T.topic_of(p) for p in split.eval] == T.TOPICS[-6:]


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="not in the task's vocabulary"):
        T.make_prompt("spaceship")
    with pytest.raises(ValueError, match="not a task prompt"):
        T.topic_of("tell me a story")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        T.ground_truth_reward(["a", "b"], ["c"])


def test_tokenizer_roundtrips_task_text_and_has_single_digit_tokens():
    tok = T.build_tokenizer()
    text = "write a happy sentence about the cat : the cat is happy and sad ."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert [len(tok(d, add_special_tokens=False)["input_ids"]) for d in ("1", "2")] == [1, 1]
    assert tok.tokenize("Preferred Response=1") == ["preferred", "response", "=", "1"]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 3)


# -------------------- damaged prompts files


# ---- prompts file: a damaged line names the file and the line --------------------------------------------
def test_damaged_prompts_file_names_file_and_line(tmp_path):
    from rlaif_fast.pipeline import files

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3 is not JSON"):
        files.read_prompts(path)


# -------------------- the SFT batch (padded by rlaif_fast.batching.pad_rollouts)


def test_sft_batch_labels_only_the_completion_and_eos():
    from rlaif_fast.pipeline.sft import sft_batch

    tok = T.build_tokenizer()
    pairs = [(T.make_prompt("cat"), "the cat is happy ."), (T.make_prompt("sea"), "calm .")]
    ids, mask, labels = sft_batch(tok, pairs)
    for i, (p, c) in enumerate(pairs):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p_ids) + len(c_ids)
        assert ids[i, :n].tolist() == p_ids + c_ids and (ids[i, n:] == tok.pad_token_id).all()
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert labels[i].tolist() == [-100] * len(p_ids) + c_ids + [-100] * (ids.shape[1] - n)
