"""Voice: audio decoding, Whisper weights and transcription, knowledge-base language models."""
