"""The command-line jobs of ``python -m fastdl``: ``demo`` (train the digits network and
report), ``tune`` (the hyperparameter search) and ``bench`` (the optimizer benchmark), with
what they share (:mod:`.common`) and the NumPy textbook versions they compare against
(:mod:`.textbook`).

The jobs sit above the library: they import ``fastdl``'s modules, and no library module imports
them (``fastdl.__main__`` alone does; ``tests/test_layout.py`` checks it).
"""
