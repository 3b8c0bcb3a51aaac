"""Base models: loading (packaged names, folders, hub ids; k-bit through bitsandbytes), the
packaged model assets, and the fingerprint that ties an adapter to its base."""
