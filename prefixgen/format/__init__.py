"""The on-disk format of a prefix store: the only package both the write and the read side import.

Everything a reader in another language needs is specified here and in FORMAT.md, one module per part:

* ``keys``: the chained block hash (:func:`root_key`, :func:`hash_block`, :func:`block_keys`, :func:`key64`);
* ``manifest``: the manifest (:class:`Manifest`, :class:`ModelFingerprint`, :class:`KVLayout`) and format versions;
* ``builds``: build records (:class:`BuildRecord`, :func:`merge_rank_parts`) and the counts file's columns;
* ``tensors``: safetensors headers (:func:`encode_safetensors_header`, :func:`read_safetensors_header`), the
  format both shards and index segments are;
* ``shards``: shard files (:func:`encode_shard`, :func:`read_shard_blocks`), block checksums
  (:func:`block_crcs`) and fp8 storage;
* ``segments``: index segments (:func:`encode_segment`, :class:`Segment`);
* ``files``: a store's file names and atomic, fsynced file writes (:func:`atomic_write`, :func:`create_once`).

Every name is re-exported here: ``from prefixgen.format import X`` works for all of them.

Example:
    >>> root = root_key("00" * 32)
    >>> keys = block_keys(list(range(32)), block_size=16, root=root)
    >>> len(keys), len(keys[0])
    (2, 32)
"""

from prefixgen.format.builds import (
    BUILD_STAT_FIELDS,
    COUNT_COLUMNS,
    PLAN_SUFFIX,
    RANK_PARTS_SUFFIX,
    BuildRecord,
    merge_rank_parts,
    record_input,
)
from prefixgen.format.files import (
    BUILDS_DIR,
    CLAIMS_DIR,
    COUNTS_DIR,
    INDEX_DIR,
    LOCKS_DIR,
    MANIFEST_FILE,
    SHARDS_DIR,
    TMP_SUFFIX,
    atomic_file,
    atomic_write,
    create_once,
    fsync_dir,
    keep_room,
    temp_path,
    write_into_room,
)
from prefixgen.format.keys import HASH_ALGORITHM, ROOT_DOMAIN, BlockHash, block_keys, hash_block, key64, root_key
from prefixgen.format.manifest import (
    COMPACTED_FORMAT_VERSION,
    FORMAT_VERSION,
    GROUPS_FORMAT_VERSION,
    HEADS_FORMAT_VERSION,
    KV_LAYOUT,
    KV_LAYOUT_HEADS,
    KV_ORDERS,
    LATEST_FORMAT_VERSION,
    SCALE_LAYOUT,
    SCALE_LAYOUT_HEADS,
    KVLayout,
    Manifest,
    ModelFingerprint,
)
from prefixgen.format.segments import (
    KEY64_CHUNK_ROWS,
    MAP_BYTES,
    OPTIONAL_COLUMNS,
    SEGMENT_COLUMNS,
    SHARD_FIELDS,
    SWEEP_ROWS,
    FileColumn,
    Segment,
    ShardRef,
    encode_segment,
    key64_chunks,
    key64_chunks_of,
    segment_header,
    segment_tensors,
)
from prefixgen.format.shards import (
    FP8_MAX,
    ShardStream,
    block_checksums,
    block_crcs,
    dequantize_fp8,
    encode_shard,
    head_row_crcs,
    quantize_fp8,
    read_shard_blocks,
    read_shard_heads,
    shard_checksum,
    shard_name,
    shard_tensors,
    token_major,
)
from prefixgen.format.tensors import (
    DTYPE_SIZES,
    ST_DTYPES,
    TORCH_DTYPES,
    SafetensorsHeader,
    TensorSpec,
    encode_safetensors_header,
    read_safetensors_header,
)

__all__ = [
    "BUILDS_DIR",
    "BUILD_STAT_FIELDS",
    "BlockHash",
    "BuildRecord",
    "CLAIMS_DIR",
    "COMPACTED_FORMAT_VERSION",
    "COUNTS_DIR",
    "COUNT_COLUMNS",
    "DTYPE_SIZES",
    "FORMAT_VERSION",
    "FP8_MAX",
    "FileColumn",
    "GROUPS_FORMAT_VERSION",
    "HEADS_FORMAT_VERSION",
    "HASH_ALGORITHM",
    "INDEX_DIR",
    "KEY64_CHUNK_ROWS",
    "KVLayout",
    "KV_LAYOUT",
    "KV_LAYOUT_HEADS",
    "KV_ORDERS",
    "LATEST_FORMAT_VERSION",
    "LOCKS_DIR",
    "MANIFEST_FILE",
    "MAP_BYTES",
    "Manifest",
    "ModelFingerprint",
    "OPTIONAL_COLUMNS",
    "SWEEP_ROWS",
    "PLAN_SUFFIX",
    "RANK_PARTS_SUFFIX",
    "ROOT_DOMAIN",
    "SCALE_LAYOUT",
    "SCALE_LAYOUT_HEADS",
    "SEGMENT_COLUMNS",
    "SHARDS_DIR",
    "SHARD_FIELDS",
    "ST_DTYPES",
    "SafetensorsHeader",
    "Segment",
    "ShardRef",
    "ShardStream",
    "TMP_SUFFIX",
    "TORCH_DTYPES",
    "TensorSpec",
    "atomic_file",
    "atomic_write",
    "block_checksums",
    "block_crcs",
    "block_keys",
    "create_once",
    "dequantize_fp8",
    "encode_safetensors_header",
    "encode_segment",
    "encode_shard",
    "head_row_crcs",
    "fsync_dir",
    "hash_block",
    "keep_room",
    "key64",
    "key64_chunks",
    "key64_chunks_of",
    "merge_rank_parts",
    "quantize_fp8",
    "read_safetensors_header",
    "read_shard_blocks",
    "read_shard_heads",
    "record_input",
    "root_key",
    "segment_header",
    "segment_tensors",
    "shard_checksum",
    "shard_name",
    "shard_tensors",
    "temp_path",
    "token_major",
    "write_into_room",
]
