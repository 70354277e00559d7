"""Layer 1, alignment (torch-free; the C++ core, numpy in and out).

surface          the bytes each token id stands for
spans            exact alignment of two tokenisations by byte spans (FuseLLM's next-token semantics)
dtw              MinED / DTW alignment of token strings (FuseLLM's fuzzy alignment)
vocab_map        source id -> target id maps, exact or MinED
chunking         cut documents so every tokenizer's tokenisation fits a block
native_threads   the one check of every ``num_threads`` argument of the C++ core
"""
