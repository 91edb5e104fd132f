"""Fitting: configuration, posed-image data, the trainers and the fit loop, the fitted model."""
