"""The warm-start demo behind ``torpor demo``: a sample app with a slow warm-up (``app.py``) and
the logic that cold starts, checkpoints and restores it and proves it carried on (``_runner``)."""
