"""Test helpers: a tiny offline teacher and corpus writers (see ``logitcache.testing.tiny``)."""
