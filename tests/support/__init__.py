"""Test support: real servers (etcd, TCPStore) and the Kubernetes API emulator."""
