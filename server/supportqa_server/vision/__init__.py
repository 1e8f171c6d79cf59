"""Images: decoding with memory limits, OCR, CLIP embeddings."""
