"""The machinery under vit_lib that the notebooks do not teach, one module per job.

storage         atomic writes, faults of the machine, paths as people read them, score files
audio_io        decoding (libsndfile, ffmpeg), streaming in blocks, loudness, silence and recording facts
corpora         the four corpus layouts, speaker-disjoint splits and the checks that they do not leak
fixture_corpus  the tiny synthetic corpus the tests and the notebooks' defaults run on
preparation     the resumable, parallel preparation journal and the dataset's tables
devices         the device, the CPU's instruction sets and the precision they allow, distributed runs
tracking        Weights & Biases
demo_corpus     the offline demo corpus builder (does not import torch)

Imports run one way: storage <- audio_io <- corpora <- preparation <- vit_lib <- vit_cli (the `vit-audio`
command line, beside vit_lib); nothing here imports vit_lib.
"""
