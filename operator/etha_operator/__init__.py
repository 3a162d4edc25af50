"""The etha operator: provisions per-KVNamespace etcd credentials with kopf."""
