"""ocigate: an OCI registry gateway as a mitmproxy addon."""
