"""Vocabulary-parallel (tensor-parallel) losses: each rank holds a slice of the vocabulary.

losses   ``fused_loss`` / ``fused_linear_loss`` on a shard: argument agreement, then the rows
stages   VocabParallelRows: the torch row stages on this rank's slice, combined across ranks
layout   where this rank's slice lies, DTensor handling, how the ranks agree on their arguments
"""
