// Object file that carries the shared precompiled header.
