"""The etha gateway: the tenant boundary between workers and etcd.

Workers never talk to etcd directly. The gateway speaks the subset of the etcd v3 gRPC
API that etha's client (and ``etcdctl get/put/del/watch/txn``) uses, authenticates each
caller against the tenant registry without bcrypt, confines every request to the
caller's key prefix, enforces per-tenant quotas, and hosts server-side waits. It is
stateless: every replica reads the registry from etcd, so any number can run behind one
Service. See ``docs/gateway.md``.

Layering: this package sits above :mod:`etha.kvstore` and :mod:`etha.distributed`; it
never imports Kubernetes. The operator imports :mod:`etha.gateway.tenancy` to write the
registry.
"""
