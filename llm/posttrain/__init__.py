"""Post-training: supervised fine-tuning, adapters, preference learning and RL.

Every stage reuses the pretraining machinery (model, mesh, logical-axis rules,
orbax checkpoints, the run-directory contract); the modules here only add what is
specific to post-training.

Modules:
  chat_data   -- chat JSONL (``messages`` lists or prompt/response pairs) -> packed
                 token rows with loss only on assistant tokens (prompt masking),
                 fed through grain with the pretraining batch fields.
  init        -- start a run from another run directory's weights (SFT, domain
                 continued pretraining); vocabulary/shape checks and vocabulary
                 extension (new embedding/output rows).
  task_score  -- greedy generation on a task family's held-out split, scored by its
                 reward (chat template or raw prompt).
"""
