"""Mail as bytes, pure and without I/O: the header block, DKIM, tokens, VERP, addresses."""
