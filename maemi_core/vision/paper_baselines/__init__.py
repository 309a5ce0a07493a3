"""The paper's comparison tables 7 and 8: every vision and graph baseline it names, trained from
scratch on the manifest's splits and scored on the benchmark's test images.

``zoo.py`` names every row (method, family, which library implements it, how it is built at
each size); ``baseline_training.py`` trains, selects on val and scores one row under its
budget; ``paper_tables.py`` writes ``table7_vision_baselines.csv`` and
``table8_graph_baselines.csv`` beside MAEMI's rows.
"""
