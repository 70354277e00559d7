"""Layer 3, batches: the corpus aligned to the target, and training batches for the loss.

corpus_align     target tokenisation, per-source alignment rows and vocabulary maps (``fastfuse align``)
align_pool       tokenising and aligning a corpus chunk by chunk, in one process or a pool
dataset          ``FusionDataset`` and ``FusionCollator``: padded ``SourceTopK`` / ``AlignMap`` batches
fusion_weights   per-source weights (MinCE, AvgCE, token choice, rewards)
schedules        step -> float schedules (ProFuser's progressive weights)

Never imports ``fastfuse.loss``: building a batch loads no loss code.
"""
