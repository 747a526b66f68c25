"""The RFB protocol without I/O: bytes in, events out, bytes back."""
