"""Harvest: read the window past the watermark, consent, redaction, dedup, caps, the snapshot."""
