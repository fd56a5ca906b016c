"""The iterative RLAIF loop (Lee et al. 2023, arXiv 2309.00267): SFT, AI feedback, reward model, RL, eval.

``rlaif-fast run CONFIG.yaml`` (:mod:`.run`), ``rlaif-fast eval`` (:mod:`.evaluate`) and ``rlaif-fast demo``
(:mod:`.demo`). Importing this package imports nothing heavy; each stage loads transformers when it runs.
"""
