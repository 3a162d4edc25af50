"""The etcd v3 backend, in layers that import one way (checked by import-linter):

``transport`` (channels, failover, log-in) < ``watch`` (one shared Watch stream per
transport) < ``client`` (unary calls, the request-size check, error mapping,
compare-and-swap) < ``wait`` (the read-at-R, watch-from-R+1 loop) < ``store``
(:class:`~etha.kvstore.etcdv3.store.EtcdKVStore`).

The public import paths stay :mod:`etha.kvstore.etcd`, :mod:`etha.kvstore.etcd_client`
and :mod:`etha.kvstore.etcd_watch`.
"""
