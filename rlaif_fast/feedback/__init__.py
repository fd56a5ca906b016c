"""AI feedback as in the RLAIF paper (Lee et al. 2023, arXiv 2309.00267): prompts, labelers, backends.

- :class:`PairwiseLabeler`: P(a > b) from the labeler's "1"/"2" log-probs, both orders averaged, kept soft.
- :class:`ScoreLabeler`: d-RLAIF, the expected 1-10 rating rescaled to [-1, 1], callable as a reward.
- :class:`RuleReward`: any ``(prompts, completions) -> scores`` callable.
- Backends: :class:`HFBackend` (a local transformers model, last-position candidate logits only),
  :class:`VLLMBackend` (a local model in an in-process vLLM engine) and
  :class:`OpenAICompatibleBackend` (a vLLM / SGLang / TGI ``/v1/completions`` endpoint).
- ``rlaif-fast label``: :mod:`rlaif_fast.feedback.job`.

Names resolve lazily: ``import rlaif_fast.feedback`` imports neither transformers nor an HTTP stack.
"""

from rlaif_fast._lazy import lazy_exports

_EXPORTS = {
    "Template": "templates",
    "PromptParts": "templates",
    "load_template": "templates",
    "BUILTIN": "builtin_templates",
    "PairLabel": "labelers",
    "PairwiseLabeler": "labelers",
    "ScoreLabeler": "labelers",
    "RuleReward": "labelers",
    "pair_label_from_orders": "labelers",
    "HFBackend": "hf_backend",
    "VLLMBackend": "vllm_backend",
    "OpenAICompatibleBackend": "http_backend",
    "BackendError": "http_backend",
    "Pair": "pairs",
    "read_pairs": "pairs",
    "make_backend": "job",
    "LabelJobConfig": "job",
    "run_label_job": "job",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
