"""What crosses the wire: record keys, array records, codecs, link directions, size limits."""
