"""Helpers for tests: decoders and a decoding RFB client."""
