"""etha: coordination for distributed jobs on an operator-provisioned etcd prefix."""

__version__ = "0.1.0"
