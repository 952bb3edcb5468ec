"""Pure, synchronous building blocks: no I/O beyond a file handle, no logging."""
