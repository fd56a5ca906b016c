"""Drop-in patches for existing RLHF code. ``rlaif_fast.integrations.trl``: ``patch()`` / ``unpatch()``
swap TRL's log-prob helpers for rlaif_fast's ops. Nothing is imported or patched until called."""
