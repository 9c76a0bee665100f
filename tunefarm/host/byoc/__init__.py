"""Vendor libraries (BYOC) as farm backends: the host-side codegens and partitions."""
