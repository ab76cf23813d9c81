"""Litestar controllers, one module per endpoint family. Thin: decode, call serving, encode."""
