"""pixelrefer_hf: PixelRefer and PixelRefer-Lite as transformers models."""
