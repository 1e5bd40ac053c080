"""``i2iu-bench`` / ``make bench``: side-by-side performance ratios measured in one process.

One module per measurement: ``step_cost`` (cost per image per method against a training step, and
the peak memory of the steps), ``unlearn_vs_retrain``, ``loader`` (data pipeline images/s against
what the step consumes), ``evaluation`` (restore + metrics images/s and peak memory at two sizes);
``main`` composes the config (conf/bench.yaml), runs them per family, prints the table and writes
the JSON. README "Performance" has the method and the figures measured on this project's machine.
"""
