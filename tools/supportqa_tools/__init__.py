"""Offline tools: evaluation, encoder adaptation, speech synthesis; never imported by the server."""
