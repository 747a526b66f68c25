"""Rectangle encoders: numpy BGRX pixels in, payload bytes out."""
