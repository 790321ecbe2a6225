"""The container registry: names to containers, refusals that name what is known, zarr imported only for zarr."""

from __future__ import annotations

import subprocess
import sys

import pytest

from logitcache.errors import ConfigError
from logitcache.store import containers
from logitcache.store.containers import get_container, register_container
from logitcache.store.containers.arrow import ArrowContainer


def test_unknown_format_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"one of 'arrow', 'zarr'; found 'parquet'"):
        get_container("parquet")


def test_a_registered_container_is_returned_and_a_taken_name_refused(monkeypatch):
    monkeypatch.setattr(containers, "_FACTORIES", dict(containers._FACTORIES))  # leave the real registry as it was
    register_container("arrow-copy", ArrowContainer)
    assert isinstance(get_container("arrow-copy"), ArrowContainer)
    with pytest.raises(ConfigError, match="'arrow' is already registered"):
        register_container("arrow", ArrowContainer)


@pytest.mark.parametrize("module, package", [("zarr", "zarr"), ("google_crc32c", "google-crc32c")])
def test_missing_zarr_is_a_config_error_naming_the_extra(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now fails as if it were not installed
    with pytest.raises(ConfigError, match=rf"needs the {package} package: pip install 'logitcache\[zarr\]'"):
        get_container("zarr")


def test_arrow_stores_never_import_zarr(tmp_path):
    """Write and read an Arrow store in a fresh interpreter; zarr stays unimported."""
    code = f"""
import sys
from logitcache.testing.store_conformance import make_header, make_rows, write_store
from logitcache.store import iter_sequences, verify_store
root = {str(tmp_path / "store")!r}
write_store(root, make_header("topk", "arrow", sequences=3, per_shard=2, ids="packed", seq_len=4),
            make_rows("topk", 3, 4, seed=1))
assert len(list(iter_sequences(root))) == 3 and verify_store(root).ok
print(sorted(m for m in sys.modules if m == "zarr" or m.startswith("zarr.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
