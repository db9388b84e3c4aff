"""Trace readers, calibration, replay and collection. Depends on ``sim``; never the other way round.

Readers (typed, validated; errors name file, line and field): ``traces.runs`` (the measured vLLM run format,
``read_run``/``write_run``), ``traces.bench_json`` (``vllm bench serve`` result JSON), ``traces.prometheus``
(``/metrics`` scrapes), ``traces.azure`` (Azure 2023 CSVs). Calibration: ``traces.calibrate.calibrate_run``
(built on ``traces.reconstruct``, ``traces.stepfit`` and ``traces.stepfit_linear``, ``traces.kvcapacity``,
``traces.hardware`` and ``traces.hfconfig``: the hardware and the model's shape, from the catalogue ``sim.catalog``
or the user; the shape-free model when neither knows them). Validation:
``traces.replay.replay_run`` (on top of calibration, for its held-out check) over ``traces.replay_core`` (a run
through the simulator, and its errors; what calibration builds on) and ``traces.plots``. A library only: the
command line (``maslat calibrate``, ``maslat replay``, ``maslat collect``) lives in ``maslat/commands``, and no
module here imports one that imports it back. Importing this package imports nothing else.
"""
