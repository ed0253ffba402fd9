"""Understanding a trained classifier: calibration, Grad-CAM, per-class analysis and the report."""
