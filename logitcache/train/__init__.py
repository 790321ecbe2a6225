"""The train stage: stream a store into any student trainer.

Rooms: ``dataset`` (streaming and map-style datasets with exact mid-epoch resume; its state checked
in ``resume_state``), ``partition`` and ``world`` (who reads which shard), ``collate`` (padded
batches), ``losses`` and ``losses_chunked`` (KD losses from sparse targets), ``metrics``,
``hf_trainer`` (``KDTrainer``) and ``loop`` (the built-in ``logitcache train`` loop). Imports the
store, never capture.
"""
