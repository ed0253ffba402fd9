"""The HTTP service: uploads decoded safely, requests batched dynamically, one Predictor."""
