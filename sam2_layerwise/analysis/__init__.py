"""Float vs quantized: capture both models into one compare run (`pair`), then measure what changed (`generate`)."""
