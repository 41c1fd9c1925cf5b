"""The object-store tests' store: SeaweedFS started and stopped by loader_bench/object_store.py.

`start_store` runs ``weed server`` on free loopback ports in a folder under /tmp, with
credentials enforced and an anonymous-read bucket; `ObjectStore.kill`/`restart`/`stop`. See
that module for the details; tests/test_s3.py uses it as a module-scoped fixture.
"""

from loader_bench.object_store import (
                                       ACCESS_KEY,
                                       PUBLIC,
                                       REGION,
                                       SECRET_KEY,
                                       NoStore,
                                       ObjectStore,
                                       running_store,
                                       start_store,
)

__all__ = ["ACCESS_KEY", "PUBLIC", "REGION", "SECRET_KEY", "NoStore", "ObjectStore", "running_store", "start_store"]
