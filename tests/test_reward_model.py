"""RewardModel: the last non-pad token under either padding side, save/load, training on AI soft labels,
the scorer for the trainer, and `rlaif-fast train-rm`."""

from __future__ import annotations

import json

import pytest
import torch

from rlaif_fast.reward import RewardModel, RewardModelScorer, train_reward_model
from rlaif_fast.reward.model import encode_pairs_side
from rlaif_fast.reward.train import main as train_rm_main
from tests.test_feedback_labelers import gpt2_tokenizer


def tiny_rm(seed=0):
    from transformers import GPT2Config

    torch.manual_seed(seed)
    return RewardModel.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128))


def test_reward_reads_the_last_real_token_under_any_padding():
    rm = tiny_rm().eval()
    seqs = [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42]]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s])) for s in seqs]).squeeze(-1)
        for side in ("left", "right"):
            ids = torch.zeros(3, 5, dtype=torch.long)
            mask = torch.zeros(3, 5, dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(5 - len(s), 5) if side == "left" else slice(0, len(s))
                ids[i, sl], mask[i, sl] = torch.tensor(s), 1
            torch.testing.assert_close(rm(ids, mask), alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="all zeros"):
        rm(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_save_and_load_roundtrip(tmp_path, shared_data):
    rm = tiny_rm().eval()
    rm.save_pretrained(tmp_path / "rm")
    back = RewardModel.from_pretrained(tmp_path / "rm")
    tok = gpt2_tokenizer(shared_data)
    a = RewardModelScorer(rm, tok)(["Hello", "Q: 2+2?"], [" there", " 4"])
    b = RewardModelScorer(back, tok)(["Hello", "Q: 2+2?"], [" there", " 4"])
    assert a == pytest.approx(b, abs=1e-6)
    with pytest.raises(ValueError, match="holds no reward_head.pt"):
        RewardModel.from_pretrained(tmp_path)


def _synthetic_pairs(n):
    """AI labels that prefer the polite response; soft, as a labeler's would be."""
    polite = [
        "Thank you, happy to help.",
        "Sure, here is how.",
        "Please see the steps below.",
        "Glad to help!",
    ]
    rude = ["Go away.", "No. Figure it out.", "Whatever, not my problem.", "Stop asking me."]
    out = []
    for i in range(n):
        a, b = polite[i % 4], rude[(i // 4) % 4]
        p = 0.9 if i % 3 else 0.75
        if i % 2:
            a, b, p = b, a, 1 - p
        out.append(
            {"context": f"Question {i}:", "response_a": a, "response_b": b, "p_a": p, "human_a": p > 0.5}
        )
    return out


def test_training_distills_soft_labels(shared_data):
    tok = gpt2_tokenizer(shared_data)
    rm = tiny_rm()
    pairs = _synthetic_pairs(32)
    out = train_reward_model(
        rm, tok, pairs, epochs=6, lr=3e-3, batch_size=8, max_length=32, eval_pairs=pairs[:8]
    )
    first, last = sum(out["losses"][:4]) / 4, sum(out["losses"][-4:]) / 4
    assert last < first - 0.1, (first, last)
    assert out["train"]["acc_ai"] >= 0.9 and out["train"]["acc_human"] >= 0.9 and out["eval"]["acc_ai"] >= 0.9
    with pytest.raises(ValueError, match="pair 0 has p_a=1.5"):
        train_reward_model(rm, tok, [{"context": "", "response_a": "a", "response_b": "b", "p_a": 1.5}])
    with pytest.raises(ValueError, match=r"pair 0 lacks \['p_a'\]"):
        train_reward_model(rm, tok, [{"response_a": "a", "response_b": "b"}])


def test_train_rm_cli(tmp_path, shared_data, capsys):
    from transformers import GPT2Config, GPT2Model

    base = tmp_path / "base"
    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(base)
    gpt2_tokenizer(shared_data).save_pretrained(base)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in _synthetic_pairs(12)))
    args = [
        "--prefs",
        str(prefs),
        "--base-model",
        str(base),
        "--out",
        str(tmp_path / "rm"),
        "--max-length",
        "32",
        "--lr",
        "1e-3",
        "--eval-fraction",
        "0.25",
    ]
    assert train_rm_main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loss", "train", "eval"} <= metrics.keys() and "acc_human" in metrics["eval"]
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    assert len(RewardModelScorer(rm, gpt2_tokenizer(shared_data))(["q"], ["a"])) == 1
    assert train_rm_main(["--prefs", str(tmp_path / "nope.jsonl"), "--base-model", "x", "--out", "y"]) == 2
    assert "run `rlaif-fast label` first" in capsys.readouterr().err


# -------------------- encoding and saving


def test_encode_pairs_side_keeps_a_context_that_fits(shared_data):
    tok = gpt2_tokenizer(shared_data)
    ctx = " ".join(f"w{i}" for i in range(150))  # 300 tokens
    resp = " ".join(f"r{i}" for i in range(40))  # 80 tokens: 380 <= 512, nothing needs cutting
    n_ctx, n_resp = len(tok(ctx)["input_ids"]), len(tok(resp)["input_ids"])
    assert n_ctx + n_resp <= 512
    ids, mask = encode_pairs_side(tok, [ctx], [resp], 512)
    assert int(mask.sum()) == n_ctx + n_resp
    assert ids[0, :n_ctx].tolist() == tok(ctx)["input_ids"]
    # and when it does not fit, the context loses its left and the row is exactly max_length long
    ids, mask = encode_pairs_side(tok, [ctx], [resp], 100)
    assert int(mask.sum()) == 100 and ids[0, 100 - n_resp :].tolist() == tok(resp)["input_ids"]
    assert ids[0, : 100 - n_resp].tolist() == tok(ctx)["input_ids"][n_ctx - (100 - n_resp) :]


def test_head_saved_on_gpu_loads_on_a_cpu_machine(tmp_path, monkeypatch):
    import torch.serialization as ser

    rm = tiny_rm().eval()
    with monkeypatch.context() as m:  # what torch.save writes for a head that lives on cuda:0
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        rm.save_pretrained(tmp_path / "rm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    back = RewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(back.head.weight, rm.head.weight)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), rm(ids), atol=1e-6, rtol=0)


# -------------------- train-rm checks its inputs before training


def test_train_rm_names_the_file_line_and_checks_out_before_training(tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")  # passes the path check; the bad inputs stop it before loading
    rows = [{"context": f"c{i}", "response_a": "a", "response_b": "b", "p_a": 0.7} for i in range(20)]
    rows[17].pop("p_a")  # line 18: reported as "pair N" counted after shuffling before
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--prefs", str(prefs), "--base-model", str(base), "--out", str(tmp_path / "rm")]
    assert train_rm_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlaif-fast train-rm: error: ") and "prefs.jsonl:18 lacks ['p_a']" in err
    rows[17]["p_a"] = "high"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_rm_main(args) == 2
    assert "prefs.jsonl:18 has p_a='high'" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    args[-1] = str(tmp_path / "a_file" / "rm")  # nothing can be written there: refused before training
    assert train_rm_main(args) == 2
    assert "--out '" in capsys.readouterr().err
    args[3] = str(tmp_path / "no_such_model")
    assert train_rm_main(args) == 2
    assert "--base-model '" in capsys.readouterr().err
