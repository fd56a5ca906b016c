"""Tiny models, a character tokenizer and a rule reward for the trainer tests (in-process and torchrun)."""

from __future__ import annotations

import torch

ALPHABET = "abcdefghij "


class CharTokenizer:
    """One id per character of ALPHABET; 0 is pad, 1 is BOS, 2 is EOS. Just the surface the trainer uses."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, extra: int = 0):
        self.extra = extra  # fake extra tokens, to provoke a vocabulary mismatch

    def __len__(self) -> int:
        return 3 + len(ALPHABET) + self.extra

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [3 + ALPHABET.index(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i - 3] for i in ids if 3 <= i < 3 + len(ALPHABET))


def tiny_gpt2(vocab: int = 16, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(vocab: int = 16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def count_a(prompts: list[str], completions: list[str]) -> list[float]:
    """Rule reward of the toy task: the fraction of 'a' in the completion (the best completion is 'aaaa...')."""
    return [c.count("a") / max(len(c), 1) for c in completions]


PROMPTS = ["ab", "cd", "ef", "gh", "ij", "ba", "dc", "fe", "hg", "ji", "ac", "bd", "ce", "df", "eg", "fh"]


def vary_lengths(model, max_new_tokens: int):
    """Make ``model.generate`` greedy with a per-prompt response length (EOS at 1 + sum(prompt) % max_new).

    The invariance tests compare runs with different rank counts, whose samples would differ; greedy
    decoding makes rollouts independent of the batch they share, and the forced EOS gives rows of
    different lengths so per-token normalization is exercised. The training path stays untouched.
    """
    base = model.generate

    def generate(input_ids, attention_mask, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
        out = base(input_ids=input_ids, attention_mask=attention_mask, **{**kwargs, "do_sample": False})
        width = input_ids.shape[1]
        for i in range(out.shape[0]):
            n = 1 + int((input_ids[i] * attention_mask[i]).sum()) % max_new_tokens
            if width + n - 1 < out.shape[1]:
                out[i, width + n - 1] = CharTokenizer.eos_token_id
                out[i, width + n :] = CharTokenizer.pad_token_id
        return out

    model.generate = generate
    return model


def invariance_run(
    steps: int = 2, fixed_lengths: bool = True, value_head: bool = False, **overrides
) -> tuple[dict, list[dict]]:
    """Train a tiny GPT-2 with a value model (``value_head``: a ValueHead on the policy's trunk) by plain
    SGD; return (full parameters, metrics per step)."""
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueHead, ValueModel

    values = dict(
        algorithm="ppo",
        batch_size=8,
        mini_batch_size=4,
        micro_batch_size=2,
        ppo_epochs=2,
        max_new_tokens=6,
        temperature=0.0,
        optimizer="sgd",
        learning_rate=0.05,
        value_learning_rate=0.01,
        max_grad_norm=0.0,
        kl_coef=0.1,
        progress=False,
        tensorboard=False,
        output_dir="/tmp/rlaif_invariance",
    )
    values.update(overrides)
    cfg = RLAIFConfig(**values)
    policy = tiny_gpt2()
    if fixed_lengths:
        policy = vary_lengths(policy, cfg.max_new_tokens)
    value_model = (ValueHead if value_head else ValueModel).from_policy(policy) if cfg.uses_critic else None
    trainer = RLAIFTrainer(policy, CharTokenizer(), count_a, cfg, value_model=value_model)
    history = [
        trainer.step(PROMPTS[i * cfg.prompts_per_step : (i + 1) * cfg.prompts_per_step]) for i in range(steps)
    ]
    with trainer.strategy.gathered(trainer.engine.module):
        params = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    return params, history


def hf_char_tokenizer():
    """CharTokenizer's ids as a transformers fast tokenizer (save_pretrained / AutoTokenizer round trip)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters back to back, no spaces between tokens
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
