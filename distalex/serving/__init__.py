"""The trained model in use: evaluate a checkpoint, predict on images, export it.

Sits on top of training (it reuses the evaluation path, the checkpoint reader
and the run's data) and below the command line, which parses the arguments and
maps errors to exit statuses (docs/design.md, "Layers"; docs/use.md).

* :mod:`~distalex.serving.loaded` -- a checkpoint with the config it is used under;
* :mod:`~distalex.serving.evaluate` -- ``launch/evaluate.py``;
* :mod:`~distalex.serving.predict` -- ``launch/predict.py``;
* :mod:`~distalex.serving.export` -- ``launch/export.py`` and its verification.
"""
