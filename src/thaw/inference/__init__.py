"""Using a trained classifier: finding input images, the Predictor (batched, TTA, ensembles),
and the ONNX Runtime path for exported files. Nothing here imports training code."""
