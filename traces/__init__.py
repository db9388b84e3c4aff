"""Trace readers, calibration, replay and collection. Depends on ``sim``; never the other way round."""
