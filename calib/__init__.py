"""INT8 calibration (see the export/calibrate issue)."""
