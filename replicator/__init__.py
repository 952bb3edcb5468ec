"""replicator: continuous data replication to a disaster-recovery site."""

__version__ = "0.1.0"
